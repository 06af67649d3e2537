"""The scripts' help: a description from the docstring, and a formatter that shows each default once. No torch
here: report.py uses it too."""

import argparse


def description(docstring):
    """A script's --help description: its docstring's first paragraph, whole (not its first line, which may
    stop mid-sentence)."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once, and only when there is one (not for None or an unset switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
