"""Model families, one file each. A family turns a Hugging Face-style config into a ModelSpec."""

from __future__ import annotations

import importlib

from ingot.errors import UnsupportedError

# Ingot family name -> module under ingot.models
FAMILIES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma3": "gemma3", "gemma4": "gemma4"}

# Hugging Face model_type / architectures spellings -> family
HF_MODEL_TYPES = {
    "llama": "llama",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma4_text": "gemma4",
    "gemma4": "gemma4",
}


def check_arch(arch: str, source: str = "model") -> str:
    if arch not in FAMILIES:
        raise UnsupportedError(
            f"{source}: unknown architecture '{arch}'. Supported: {', '.join(sorted(FAMILIES))}"
        )
    return arch


def family(arch: str):
    """The family module for an Ingot architecture name."""
    return importlib.import_module(f"ingot.models.{FAMILIES[check_arch(arch)]}")


def build_spec(arch: str, config: dict, max_context: int | None = None):
    return family(arch).spec(config, max_context=max_context)
