"""The base model's evaluation as evaluate_base_model.py runs it: its flags. The script is the recipe; the study
parses its runs' command lines here, never through the script."""

from lvf import settings

METHOD = "base"


def parse_args(argv=None, about=None):
    """evaluate_base_model.py's Settings from argv (about: its --help description; the study parses without)."""
    parser = settings.evaluation_parser(about, METHOD)
    return settings.parse(parser, argv, sections=("shared", "evaluate_base_model"))
