"""The progress bar every long load shows: bytes, shown by default only when there are over 100 MB."""

from __future__ import annotations

SHOW_ABOVE = 100 * 2**20


def byte_bar(total: int, desc: str, progress: bool | None = None):
    from tqdm import tqdm

    show = progress if progress is not None else total > SHOW_ABOVE
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False)
