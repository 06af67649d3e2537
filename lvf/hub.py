"""Hub ids that fail in seconds: a cached copy is used as it is, otherwise one metadata request with a
short time-out tells a typo, a gated repository or no network apart before anything loads; for a gated
repository, huggingface_hub.auth_check then asks whether this token has been granted access (repo_info answers
for a gated repository whether or not its licence was accepted)."""

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from lvf.errors import UsageError


def ensure_hub_reachable(repo_id, kind="model", timeout=5.0):
    """Fails in seconds, not after the ~25-50 s network time-out, when a Hub id cannot be fetched:
    one metadata request with a short time-out, which also catches a typo or a gated repo."""
    if _in_hub_cache(repo_id, kind):
        return
    if is_offline_mode():
        raise UsageError(f"{kind} {repo_id!r} is not a local path and HF_HUB_OFFLINE=1 (not in the cache)")
    try:
        info = HfApi().repo_info(repo_id, repo_type=kind, timeout=timeout)
    except GatedRepoError:
        raise UsageError(f"{kind} {repo_id!r} is gated: accept its licence on the Hub, then log in") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{kind} {repo_id!r} not found on the Hub (or private: log in first)") from None
    except Exception as error:  # connection refused, DNS, time-out, proxy: all mean "cannot reach"
        raise UsageError(f"{kind} {repo_id!r} is not a local path and the Hub cannot be reached "
                         f"({type(error).__name__}): check the network, or pass a local folder") from None
    if info.gated and get_token() is None:
        raise UsageError(f"{kind} {repo_id!r} is gated: accept its licence on the Hub, then log in "
                         "(hf auth login, or set HF_TOKEN)")
    if info.gated:
        check_gated_access(repo_id, kind)


def check_gated_access(repo_id, kind="model"):
    """Raises UsageError unless this token may download the gated repo_id (auth_check: GatedRepoError when its
    licence is not accepted for this account, or the request is pending). GatedRepoError is a
    RepositoryNotFoundError, hence the order of the handlers."""
    try:
        HfApi().auth_check(repo_id, repo_type=kind)
    except GatedRepoError:
        raise UsageError(f"{kind} {repo_id} is gated and this Hub token has no access to it: accept its licence "
                         f"on https://huggingface.co/{repo_id} with the account you logged in with (hf auth whoami), "
                         "wait for the approval, then run again") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{kind} {repo_id} not found on the Hub (or private: log in with an account that can "
                         "read it: hf auth login)") from None


def _in_hub_cache(repo_id, kind):
    folder = Path(HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"
    return folder.is_dir()
