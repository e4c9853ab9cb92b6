"""Errors a user can act on. The CLI prints their message without a traceback."""


class IngotError(Exception):
    """Base class for every error that names a user-facing problem."""


class FormatError(IngotError):
    """A model file or folder is malformed, truncated or not what it claims to be."""


class UnsupportedError(IngotError):
    """Something well-formed that Ingot does not support (architecture, quant type, ...)."""


class ContextLengthError(IngotError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""


class VerificationError(IngotError):
    """A file's signature or checksums do not match its contents."""
