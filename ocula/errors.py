"""Typed errors. Every message says what was wrong and what to do about it."""


class OculaError(Exception):
    """Base class of every error ocula raises on purpose."""


class ConfigError(OculaError, ValueError):
    """A config file is missing, malformed, or has a value ocula cannot use (the message names the key)."""


class UnknownModelTypeError(ConfigError):
    """config.json names a model_type / architecture that ocula does not implement."""


class CheckpointNotFoundError(OculaError, OSError):
    """A path or hub id could not be resolved to a local checkpoint folder."""


class WeightsError(OculaError):
    """Checkpoint weights do not match the model: missing, unexpected or misshapen tensors."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class MediaError(OculaError, ValueError):
    """An image or video could not be read or is not a supported input."""


class MediaTooLargeError(MediaError):
    """An image or video exceeds a configured size limit."""


class PlaceholderMismatchError(OculaError, ValueError):
    """The number of media placeholders in the text does not match the media given."""


class UnsupportedFeatureError(OculaError, NotImplementedError):
    """A known option of transformers that ocula does not implement (yet)."""


class RequestTooLargeError(OculaError, ValueError):
    """A request can never fit the engine's limits (prompt tokens, KV cache)."""
