"""Typed errors. Each names the file (or field) and the cause, so a reject reason is readable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class LumoError(Exception):
    """Base of every error Lumo raises on purpose."""


# Set by the Dagster layer around the lumo_core calls it makes in its own process (a `lumo`
# process launched through Pipes knows from its environment): hints then name the asset to
# materialize, not the `lumo` command that would bypass the Dagster instance.
_DAGSTER_HINTS: ContextVar[bool] = ContextVar("lumo_dagster_hints", default=False)


@contextmanager
def dagster_hints() -> Iterator[None]:
    """Within this block, `rebuild_hint` phrases its fix as a Dagster materialization."""
    token = _DAGSTER_HINTS.set(True)
    try:
        yield
    finally:
        _DAGSTER_HINTS.reset(token)


def rebuild_hint(asset: str, command: str) -> str:
    """How to (re)build `asset`, in the words of the tool the user is running: under Dagster
    (a Pipes launch, or `dagster_hints()`), the asset and the selection that materializes it
    with its ancestors; otherwise the `lumo` command, with the asset named for Dagster users."""
    if _DAGSTER_HINTS.get() or "DAGSTER_PIPES_CONTEXT" in os.environ:
        return f"materialize the `{asset}` asset (`dagster asset materialize -m lumo_pipeline --select '*{asset}'`, or Materialize in the UI)"
    return f"`{command}` (the `{asset}` asset in Dagster)"


class ConfigError(LumoError):
    """A config file is missing, unparsable or fails validation (message names the field)."""


class TokenSpaceError(LumoError):
    """A token space is inconsistent, or an id / code falls outside its range."""


class MissingUpstreamError(LumoError):
    """A step needs the output of an upstream step that was never produced."""


class AdapterLoadError(LumoError):
    """A tokenizer or codec could not be loaded (names what is missing and where it looked)."""


class MediaError(LumoError):
    """A media file cannot be used. `reason` is a short machine-friendly code for reports."""

    reason = "media_error"

    def __init__(self, path: object, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.reason}: {self.path}: {detail}")


class MissingFileError(MediaError):
    reason = "missing_file"


class UnreadableMediaError(MediaError):
    reason = "unreadable_media"


class TruncatedMediaError(MediaError):
    reason = "truncated_media"


class EmptyAudioError(MediaError):
    reason = "zero_length_audio"


class AudioTooLongError(MediaError):
    reason = "audio_too_long"


class ImageTooLargeError(MediaError):
    reason = "image_too_large"


class AudioTooLargeError(MediaError):
    """The audio header declares more than `limits` allow (rate, channels, frames x channels)."""

    reason = "audio_too_large"


class ImageFormatNotAllowedError(MediaError):
    """An image in a Pillow format outside `limits.image_formats`."""

    reason = "image_format_not_allowed"


class MediaTooLargeError(MediaError):
    """A media file over `limits.max_media_bytes`."""

    reason = "media_file_too_large"


class PathOutsideRootsError(MediaError):
    reason = "path_outside_data_roots"


class LockHeldError(LumoError):
    """Another process writes the same output (the message names it: pid, host, since when)."""


class DiskFullError(LumoError):
    """A write ran out of space or into the file-size limit (the message names the file and the
    bytes it needed)."""


class DamagedFileError(LumoError):
    """A file Lumo wrote and reads back (a spool, a cache entry, an index) fails its checks."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: damaged: {detail}")


class StopRequested(LumoError):
    """The process was asked to stop (SIGTERM, as Dagster's Terminate sends it)."""


class ManifestError(LumoError):
    """The manifest file itself cannot be read (bad rows are rejects, not errors)."""


class TextTooLongError(MediaError):
    reason = "text_too_long"


class DecoderFailedError(MediaError):
    """A decoder raised something no decoder should (reported by the guarded worker pool)."""

    reason = "decoder_failed"


class DecoderTimeoutError(MediaError):
    """The media worker spent longer than `pipeline.decoder_timeout_s` on the file; it was killed."""

    reason = "decoder_timeout"


class DecoderCrashedError(MediaError):
    """The media worker process died while it decoded the file (a native crash, an OOM kill)."""

    reason = "decoder_crashed"


DECODER_FAULTS = {error.reason: error for error in (DecoderFailedError, DecoderTimeoutError, DecoderCrashedError)}
