"""GGUF files (v2/v3) through llama.cpp's own reader, gguf-py: metadata and memory-mapped tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingot.errors import FormatError

GGUF_MAGIC = b"GGUF"


def open_reader(path: str | Path):
    """A gguf.GGUFReader over the memory-mapped file, or a FormatError naming what is wrong."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise FormatError(f"{path}: truncated or corrupt GGUF file ({e})") from None


def read_metadata(reader_or_path) -> dict:
    """All key/value pairs as plain Python values (str, int, float, bool, lists of those)."""
    reader = open_reader(reader_or_path) if isinstance(reader_or_path, (str, Path)) else reader_or_path
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta
