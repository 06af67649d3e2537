"""Bad input, as every floor of the kit raises it: common.py's data checks, lvf's, the scripts'. The class alone,
below common.py and lvf/ (which both import it) and stdlib only, so that report.py and the study's Ray workers,
which never import torch, raise and catch it too. lvf.errors.main_guard prints it as one line, exit status 2."""


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, no traceback."""
