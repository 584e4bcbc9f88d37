"""The model-management errors: each one line a user can act on (never containing a token),
each a kind of engine/errors.py's error so the CLI and the TUI show them as they show any other."""

from __future__ import annotations

from mixtral_chat.engine.errors import ConfigError, MixtralChatError, ModelNotFoundError


class RegistryError(MixtralChatError):
    """The local registry file is unreadable, or a registry operation is not allowed."""


class QuantizedCopyMissingError(ModelNotFoundError):
    """A model was quantized, and its quantized directory is gone."""


class UnsupportedArchitectureError(ConfigError):
    """A model's config.json describes something other than a Mixtral (MoE) model."""


# Downloads from the hub.


class DownloadError(MixtralChatError):
    """A download failed; the message says why and what to do."""


class HubUnreachableError(DownloadError):
    """No connection to the hub (offline, DNS, refused, timeout, HF_HUB_OFFLINE)."""


class GatedRepoAccessError(DownloadError):
    """The repo is gated and the request had no token, or the token has no access."""


class HubAuthError(DownloadError):
    """The hub rejected the token itself."""


class RepoNotFoundError(DownloadError):
    """No such repo (or it is private and the token cannot see it)."""


class RevisionNotFoundError(DownloadError):
    """The repo exists, the revision (branch, tag or commit) does not."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file does not match the size or checksum the hub lists for it."""


class DiskFullError(DownloadError):
    """The disk filled up during a download (ENOSPC)."""


class InsufficientDiskSpaceError(DownloadError):
    """The pull would not fit on the disk: refused before downloading."""


class DownloadCancelled(DownloadError):
    """The caller's cancel event was set; partial files are kept for the next pull."""


class UnsupportedRepoError(DownloadError):
    """The repo lacks what mixtral-chat needs (config.json, safetensors weights, tokenizer.model)."""
