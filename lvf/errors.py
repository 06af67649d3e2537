"""How a script ends: bad input is one line and exit 2, results written elsewhere than asked exit 3, a signal
is exit 130, anything else a traceback."""

import os
import signal
import sys

from usage_error import UsageError  # defined below common.py, which raises it too

RESULTS_ELSEWHERE_EXIT_STATUS = 3  # the run finished, but its results are not where --output said (1 is a traceback)
USAGE_EXIT_STATUS = 2
SIGNAL_EXIT_STATUS = 130  # after SIGINT or SIGTERM, whether or not a checkpoint was saved; no results file


class ResultsWrittenElsewhere(Exception):
    """The run finished but its results could not be written where asked; they were written elsewhere."""


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""


def main_guard(main):
    """Runs a script's main: bad input is one line and exit 2; results that could only be written elsewhere
    are one line saying where and exit 3; a signal is exit 130 (with a checkpoint when it comes during
    training); --debug or LVF_DEBUG=1 shows tracebacks."""
    debug = "--debug" in sys.argv or os.environ.get("LVF_DEBUG") == "1"
    # Outside training, SIGTERM stops like Ctrl-C does: no results, status 130, no traceback.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        status = main()
    except UsageError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_STATUS)
    except ResultsWrittenElsewhere as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(RESULTS_ELSEWHERE_EXIT_STATUS)
    except (Interrupted, KeyboardInterrupt) as error:
        if debug and isinstance(error, KeyboardInterrupt):
            raise
        print(f"stopped: {str(error) or 'by a signal, before any results were written'}", file=sys.stderr)
        sys.exit(SIGNAL_EXIT_STATUS)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status:  # a dry run's pre-flight that found a problem
        sys.exit(status)
