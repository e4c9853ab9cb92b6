"""Model files and folders in: GGUF and .ingot files, Hugging Face and MLX safetensors folders."""

from __future__ import annotations

from pathlib import Path

from ingot.errors import FormatError, IngotError


def open_checkpoint(path: str | Path):
    """A Checkpoint for a .gguf or .ingot file or a safetensors folder (HF or MLX-quantized)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise IngotError(f"{path}: no such file or folder")
    if path.is_dir():
        from ingot.formats.hf import load_hf

        return load_hf(path)
    from ingot.formats.native import MAGIC, SUFFIX

    with open(path, "rb") as f:
        head = f.read(8 + len(MAGIC))
    if head[:4] == b"GGUF":
        from ingot.formats.gguf import load_gguf

        return load_gguf(path)
    if head[8:] == MAGIC or path.suffix == SUFFIX:
        from ingot.formats.native import load_native

        return load_native(path)  # a .ingot name with the wrong magic gets the format's own error
    raise FormatError(
        f"{path}: not a model file Ingot can read (expected a GGUF or .ingot file, or a folder with config.json "
        "and *.safetensors)"
    )
