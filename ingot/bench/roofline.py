"""The memory-bandwidth roof a decode step is measured against: a large device-to-device copy."""

from __future__ import annotations

import statistics
import time

import torch

GiB = 1 << 30


def copy_bandwidth(device, nbytes: int = GiB, runs: int = 10) -> float | None:
    """Bytes moved per second (read + write) by a large copy on device; the median of `runs` timed copies.

    On a CUDA device: two buffers of nbytes (at least 1 GiB), timed with CUDA events after a warm-up copy.
    On the CPU: a memcpy estimate with 256 MiB buffers (None if they cannot be allocated).
    """
    device = torch.device(device)
    if device.type == "cuda":
        nbytes = max(int(nbytes), GiB)
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        src.fill_(1)
        dst.copy_(src)  # warm-up
        torch.cuda.synchronize(device)
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / statistics.median(times)
    if device.type == "cpu":
        nbytes = min(int(nbytes), 256 << 20)
        try:
            src = torch.ones(nbytes, dtype=torch.uint8)
            dst = torch.empty_like(src)
        except RuntimeError:
            return None
        dst.copy_(src)
        times = []
        for _ in range(max(3, runs // 2)):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        return 2 * nbytes / statistics.median(times)
    return None


def device_name(device) -> str:
    """The GPU's name, or 'cpu'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bw = copy_bandwidth(dev)
    print(f"{device_name(dev)}: copy bandwidth {bw / 1e9:.1f} GB/s" if bw else f"{dev}: not measured")
