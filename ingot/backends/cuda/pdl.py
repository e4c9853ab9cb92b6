"""Programmatic dependent launch (Hopper): the decode step's kernels overlap their neighbours' edges.

A decode step is ~100 short kernels, and each one's start used to wait for the previous one's last program,
then spend its first microseconds on launch and on the DRAM latency of its first weight loads. Launched with
programmatic stream serialization (`launch_kwargs()`), a kernel's programs may start as soon as every
program of the kernel before it has called `release()`, while that kernel is still running. The rule that
keeps this correct, for every kernel that takes part:

- before `wait()` a kernel touches only memory nothing in the step writes: its weights. The GEMVs use that
  window to ask for their whole weight slab in L2 (`prefetch_rows`), so the loads after `wait()` hit L2;
- `wait()` returns once the previous kernel has finished and its writes are visible; every other read and
  every write comes after it;
- `release()` right after `wait()`: at most two kernels overlap, and the earlier one is never short of
  programs' slots.

A kernel launched without the attribute simply waits for its predecessor; `wait()` and `release()` are
harmless then. Off under TRITON_INTERPRET and below sm_90, or with INGOT_PDL=0 (for A/B measurements).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _mode() -> int:
    """Bits: 1 launch with the attribute (and wait), 2 prefetch weights before waiting, 4 release right after
    waiting. INGOT_PDL overrides the default for A/B measurements; 0 everywhere PDL cannot run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9):
        return 0
    return int(os.environ.get("INGOT_PDL", "7"))


MODE = _mode()
ENABLED = MODE  # the kernels' PDL constexpr


def launch_kwargs() -> dict:
    """Extra launch arguments of a kernel that follows the rule above (and takes PDL=ENABLED)."""
    return {"launch_pdl": True} if MODE & 1 else {}


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL & 1:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release(PDL: tl.constexpr):
    if PDL & 4:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    wait(PDL)
    release(PDL)


@triton.jit
def prefetch_rows(base_ptr, row_stride_bytes, rows, row_ok, begin_bytes, nbytes, PDL: tl.constexpr):
    """Ask for bytes [begin, begin + nbytes) of each row in L2 (sm_90 bulk prefetch, no registers held).
    The range is widened to 16-byte addresses; the weight arena aligns and pads every tensor to 256 bytes,
    so the widened range stays inside the tensor's slot."""
    if PDL & 2:
        start = base_ptr.to(tl.int64) + rows.to(tl.int64) * row_stride_bytes + begin_bytes
        lo = (start // 16) * 16
        hi = ((start + nbytes + 15) // 16) * 16
        size = tl.where(row_ok, hi - lo, 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; } // $0",
            "=r,l,r", [lo, size], dtype=tl.int32, is_pure=False, pack=1)
