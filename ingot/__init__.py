"""Ingot: a local LLM inference runtime."""

from ingot.errors import IngotError

__version__ = "0.1.0"


def load(path_or_name, device=None, max_context=None, **kwargs):
    """Load a model file, folder or embedded name; see ingot.api.load."""
    from ingot.api import load as _load

    return _load(path_or_name, device=device, max_context=max_context, **kwargs)


__all__ = ["load", "IngotError", "__version__"]
