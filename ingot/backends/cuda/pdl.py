"""Programmatic dependent launch (Hopper): each decode kernel is launched while its predecessor finishes.

A decode step is ~90 short kernels in a CUDA graph. Launched with programmatic stream serialization
(`**LAUNCH` among its launch arguments), a kernel's programs may be scheduled before the previous kernel has
fully retired, and `wait()`, the first thing each such kernel does, returns once that kernel has finished
and its writes are visible. Every kernel launched this way must call `wait()` before it reads or writes
anything; one launched without the attribute waits for its predecessor as usual, and `wait()` is harmless
there.

Measured on an H200 (2026-12-01, `ingot bench` tg128, benchmarks/results/2026-12-01-h200-ingot.csv): +1.6% on
Llama-3.2-1B Q4_0 (1031 -> 1048 tok/s), +0.8% on Qwen3-8B Q4_0 (265 -> 267). Two ways of using the window
were measured (benchmarks/step_time.py, graph replay of one step, Llama-3.2-1B Q4_0 at 982 us without PDL,
before the split-K fix of 48a62dc) and dropped: releasing dependents right after the wait (1063 us: the
early-scheduled programs cost more than they overlap) and prefetching each program's weight slab into L2
with cp.async.bulk.prefetch before the wait (1170 us: ~2.4 us of TMA issue per kernel, one bulk op per
weight row).
Off under TRITON_INTERPRET and below sm_90, or with INGOT_PDL=0 (for A/B measurements).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("INGOT_PDL", "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


ENABLED = _enabled()
# The launch arguments of every kernel that calls wait(PDL) first: its PDL constexpr, and the attribute.
LAUNCH = {"PDL": ENABLED, "launch_pdl": True} if ENABLED else {"PDL": False}
EARLY = ENABLED and os.environ.get("INGOT_PDL_EARLY", "1") == "1"


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
