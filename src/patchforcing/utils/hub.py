"""The Hugging Face hub, failing fast: one quick probe before a download, so that a machine without
network (or a wrong repo id) gets one clear error at once instead of half a minute of retries.

``huggingface_hub`` is an optional dependency (``patchforcing[hub]``); this module is the one
place it is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import is_offline

__all__ = ["HubError", "import_hub", "probe_hub_file", "hub_download", "PROBE_TIMEOUT_S"]

#: seconds the probe waits for the hub before giving up (no retries)
PROBE_TIMEOUT_S = 5.0


class HubError(RuntimeError):
    """A hub file that cannot be had: offline and not cached, unreachable hub, no such repo/file."""


def import_hub() -> Any:
    """The ``huggingface_hub`` module; :class:`HubError` with the install hint when it is absent."""
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("huggingface_hub is not installed (pip install 'patchforcing[hub]')") from None
    return huggingface_hub


def _describe(err: BaseException) -> str:
    name = type(err).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if name == "RepositoryNotFoundError":
        return "no such repository on the hub (or it is private/gated: log in with `hf auth login`)"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return "the repository has no such file"
    if name == "GatedRepoError":
        return "the repository is gated: accept its terms on the hub and log in with `hf auth login`"
    if isinstance(err, (ConnectionError, TimeoutError, OSError)) or "Connect" in name or "Timeout" in name:
        return f"the hub is unreachable ({name}{': ' + first if first else ''}); set HF_HUB_OFFLINE=1 to use the cache only"
    return f"{name}: {first}" if first else name


def probe_hub_file(
    repo_id: str, filename: str, *, subfolder: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> None:
    """Check, with one request and no retries, that the hub serves ``repo_id``'s ``filename``.

    Raises:
        HubError: offline, unreachable, no such repository or file (the reason in words).
    """
    if is_offline():
        raise HubError("offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache")
    hub = import_hub()
    try:
        url = hub.hf_hub_url(repo_id, filename, subfolder=subfolder)
        hub.get_hf_file_metadata(url, timeout=timeout)
    except Exception as err:  # connection, HTTP and validation errors alike: say what happened
        raise HubError(_describe(err)) from None


def _cached(hub: Any, repo_id: str, filename: str, subfolder: str | None) -> Path | None:
    try:
        return Path(hub.hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError) or a bad id: no cached copy
        return None


def hub_download(
    repo_id: str, filename: str, *, subfolder: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> Path:
    """The local path of ``repo_id``'s ``filename``: downloaded into the Hugging Face cache when the
    hub answers a quick probe, else the cached copy; never a long retry loop.

    Offline (``HF_HUB_OFFLINE=1``) only the cache is used.

    Raises:
        HubError: not cached and not fetchable (offline, unreachable, no such repository or file).
    """
    hub = import_hub()
    if is_offline():
        cached = _cached(hub, repo_id, filename, subfolder)
        if cached is None:
            raise HubError("offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache")
        return cached
    try:
        probe_hub_file(repo_id, filename, subfolder=subfolder, timeout=timeout)
    except HubError:
        cached = _cached(hub, repo_id, filename, subfolder)
        if cached is None:
            raise
        return cached
    try:
        return Path(hub.hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder, etag_timeout=timeout))
    except Exception as err:
        raise HubError(_describe(err)) from None
