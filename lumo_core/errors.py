"""Typed errors. Each names the file (or field) and the cause, so a reject reason is readable."""

from __future__ import annotations


class LumoError(Exception):
    """Base of every error Lumo raises on purpose."""


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


class PathOutsideRootsError(MediaError):
    reason = "path_outside_data_roots"


class ManifestError(LumoError):
    """The manifest file itself cannot be read (bad rows are rejects, not errors)."""


class TextTooLongError(MediaError):
    reason = "text_too_long"
