"""Domain errors. Each message names the problem and the fix; the CLI prints it on one line and
exits with code 2, the API maps it to a 4xx answer."""

from typing import Optional


class FaceIDError(Exception):
    """Base of every error FaceID reports to a user (never a bug)."""


class ConfigError(FaceIDError):
    """A training configuration that cannot run (bad combination, missing weights, ...)."""


class DataError(FaceIDError):
    """A dataset folder or pairs file that cannot be used."""


class ImageError(FaceIDError):
    """An uploaded or listed file that is not a usable image."""

    field: Optional[str] = None  # the form field of an upload, set by the server (the answer's "field")


class ImageTooLargeError(ImageError):
    """An image over the byte or pixel limit."""


class CheckpointError(FaceIDError):
    """A checkpoint file that is missing, corrupt, or not a FaceID checkpoint."""


class ModelNotReadyError(FaceIDError):
    """No model is loaded yet."""
