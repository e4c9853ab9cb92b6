"""Programmatic dependent launch (Hopper): each decode kernel is launched while its predecessor finishes.

A decode step is ~90 short kernels in a CUDA graph. Launched with programmatic stream serialization
(`**LAUNCH` among its launch arguments), a kernel's programs may be scheduled before the previous kernel has
fully retired, and `wait()`, the first thing each such kernel does, returns once that kernel has finished
and its writes are visible. Every kernel launched this way must call `wait()` before it reads or writes
anything; one launched without the attribute waits for its predecessor as usual, and `wait()` is harmless
there.

Measured on an H200 (2026-12-01, `ingot bench` tg128, benchmarks/results/2026-12-01-h200-ingot.csv): +1.6% on
Llama-3.2-1B Q4_0 (1031 -> 1048 tok/s), +0.8% on Qwen3-8B Q4_0 (265 -> 267).

The decode GEMVs also release their dependents right after their own wait (`EARLY`, `INGOT_PDL_EARLY=0` turns
it off), and load their first weight tiles before the wait, since weights do not depend on the previous
kernel: so the next GEMV's weight loads overlap this one's tail. Graph replay of one step on the H200
(benchmarks/step_time.py, 2026-12-01): Llama-3.2-1B Q4_0 1017 -> 952 us, Q8_0 922 -> 907, Qwen3-8B Q4_0
3814 -> 3754, the same greedy tokens. Early release alone, without the weights loaded ahead, had measured
worse (1063 against 982 us on Llama-3.2-1B Q4_0), and so had prefetching each program's weight slab into L2
with cp.async.bulk.prefetch before the wait (1170 us: ~2.4 us of TMA issue per kernel).
The MoE decode kernels (router, expert gate/up and down), the RMSNorm kernel (Gemma's sandwich norms) and
Gemma 4's elementwise steps (gemma4_ops) start with begin(): a wait, then the early release, with nothing loaded ahead (the experts' weights follow the
routing). Until 2026-12-03 they launched without PDL, so each of Qwen3-30B-A3B's 48 layers had three kernel
boundaries with no overlap, and each Gemma layer two; the change is not measured yet.
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
# The launch arguments of a kernel that starts with begin(PDL, EARLY).
LAUNCH_EARLY = {**LAUNCH, "EARLY": EARLY}


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def begin(PDL: tl.constexpr, EARLY: tl.constexpr):
    """wait(), then (EARLY) let the next kernel's programs be scheduled: the start of a kernel that loads
    nothing ahead of its wait (the MoE decode kernels, whose weights follow the routing)."""
    wait(PDL)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
