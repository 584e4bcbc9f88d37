"""Errors from huggingface_hub / httpx, as one line a user can act on (never echoing the token)."""

from __future__ import annotations

from mixtral_chat.engine.models.errors import (
    DownloadError,
    GatedRepoAccessError,
    HubAuthError,
    HubUnreachableError,
    RepoNotFoundError,
    RevisionNotFoundError,
)


def _has_token(token: str | None) -> bool:
    if token:
        return True
    from huggingface_hub import get_token

    try:
        return bool(get_token())
    except Exception:
        return False


def translate_hub_error(
    exc: BaseException, *, repo_id: str, revision: str, endpoint: str, token: str | None
) -> DownloadError:
    """Map huggingface_hub/httpx errors to our one-line errors. Never echoes the token."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import RevisionNotFoundError as HubRevisionNotFound

    if isinstance(exc, DownloadError):
        return exc
    page = f"{endpoint}/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if not _has_token(token):
            return GatedRepoAccessError(
                f"{repo_id} is gated: accept its terms at {page} while logged in, then give mixtral-chat "
                "a token: set the HF_TOKEN environment variable or run `hf auth login`"
            )
        return GatedRepoAccessError(
            f"your Hugging Face token has no access to the gated repo {repo_id}: accept its terms at "
            f"{page} with the account the token belongs to (or use another token via HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if _has_token(token) else " (a private repo needs a token: HF_TOKEN or `hf auth login`)"
        return RepoNotFoundError(f"repository {repo_id} not found on {endpoint}{hint}")
    if isinstance(exc, HubRevisionNotFound):
        return RevisionNotFoundError(f"revision '{revision}' not found in {repo_id}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(
            f"a file listed for {repo_id}@{revision} is missing on {endpoint}; try again later"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachableError(
            f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE) and it is not fully cached"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return HubAuthError(
                f"{endpoint} rejected the Hugging Face token (invalid credentials); set a valid one in "
                "HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return HubAuthError(f"{endpoint} refused access to {repo_id} with this token (HTTP 403)")
        if status is not None and status >= 500:
            return HubUnreachableError(f"{endpoint} answered HTTP {status} for {repo_id}; try again later")
        return DownloadError(f"{endpoint} answered HTTP {status} for {repo_id}")
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError)):
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return HubUnreachableError(
            f"cannot reach the Hugging Face hub at {endpoint} ({reason}); check your connection"
        )
    if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.TransportError)):
        return HubUnreachableError(
            f"the connection to {endpoint} kept failing while downloading {repo_id}; pull again to resume"
        )
    reason = " ".join(str(exc).split())
    return DownloadError(f"downloading {repo_id} failed: {type(exc).__name__}: {reason}")
