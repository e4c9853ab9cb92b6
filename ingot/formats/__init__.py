"""Model files and folders in: GGUF files, Hugging Face and MLX safetensors folders."""

from __future__ import annotations

from pathlib import Path

from ingot.errors import FormatError, IngotError


def open_checkpoint(path: str | Path):
    """A Checkpoint for a .gguf file or a safetensors folder (HF or MLX-quantized)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise IngotError(f"{path}: no such file or folder")
    if path.is_dir():
        from ingot.formats.hf import load_hf

        return load_hf(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from ingot.formats.gguf import load_gguf

        return load_gguf(path)
    raise FormatError(
        f"{path}: not a model file Ingot can read (expected a GGUF file, or a folder with config.json and "
        "*.safetensors)"
    )
