"""Registers, spills and shared memory of the M = 1 decode GEMV kernels (and of the word MoE experts kernel)
compiled for sm_90a, on any machine (no GPU needed: Triton compiles to PTX and its bundled ptxas reports the
resources), and the instructions in each kernel's main loop (the longest backward branch of its SASS) with
the five most frequent opcodes.

    python3 benchmarks/kernel_regs.py [SOURCE_TREE]          (default: this checkout)
    python3 benchmarks/kernel_regs.py --gemm [SOURCE_TREE]   the prefill GEMM at M = 512 instead (Qwen3-8B, q4)
    python3 benchmarks/kernel_regs.py --moe [SOURCE_TREE]    the MoE grouping, byte decode and grouped GEMM kernels

At 4 warps a program of R registers per thread leaves 65536 / (128 R) programs per SM: above 128 registers,
at most 3; at 255, 2. For the latency-bound decode GEMVs that is the loads in flight, so compare trees
before spending device time on them (e.g. `git archive BRANCH ingot | tar -x -C /tmp/tree`).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nv_compiler  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# (name, constexprs) at the decode step's shapes: plan()'s tiles for each kind
CASES = [
    ("q4 qkv (norm)", dict(WIDTH=4, HAS_NORM=True, GATED=0, HAS_RES=False, BLOCK_N=128, BLOCK_K=256)),
    ("q4 gate_up (norm, silu)", dict(WIDTH=4, HAS_NORM=True, GATED=1, HAS_RES=False, BLOCK_N=128, BLOCK_K=256)),
    ("q4 gate_up (norm handed in)", dict(WIDTH=4, HAS_NORM=False, NORMED=True, GATED=1, HAS_RES=False, BLOCK_N=128,
                                         BLOCK_K=256)),
    ("q4 down (residual)", dict(WIDTH=4, HAS_NORM=False, GATED=0, HAS_RES=True, BLOCK_N=128, BLOCK_K=256)),
    ("q4 down (norm handed on)", dict(WIDTH=4, HAS_NORM=False, GATED=0, HAS_RES=True, NORM_OUT=True, BLOCK_N=128,
                                      BLOCK_K=256)),
    ("q8 gate_up (norm, silu)", dict(WIDTH=8, HAS_NORM=True, GATED=1, HAS_RES=False, BLOCK_N=128, BLOCK_K=128)),
    ("q8 down (residual)", dict(WIDTH=8, HAS_NORM=False, GATED=0, HAS_RES=True, BLOCK_N=128, BLOCK_K=128)),
]
COMMON = dict(GROUP=32, HAS_MIN=False, SPLIT=True, PDL=True, EARLY=True, X_PAIRS=True, NORMED=False, NORM_OUT=False,
              PARTS_BLOCK=32)  # SIGNED: q8 (int8)
# moe._expert_word_kernel (INGOT_MOE_DECODE=word) at Qwen3-30B-A3B's decode, its default block_n
MOE_CASES = [
    ("q4 experts gate_up (silu)", dict(WIDTH=4, GATED=1, HAS_RES=False, BLOCK_N=32, BLOCK_K=256)),
    ("q4 experts down (residual)", dict(WIDTH=4, GATED=0, HAS_RES=True, BLOCK_N=64, BLOCK_K=256)),
    ("q8 experts gate_up (silu)", dict(WIDTH=8, GATED=1, HAS_RES=False, BLOCK_N=32, BLOCK_K=128)),
    ("q8 experts down (residual)", dict(WIDTH=8, GATED=0, HAS_RES=True, BLOCK_N=64, BLOCK_K=128)),
]


# Integer arguments that are multiples of 16 at every decode shape: Triton specializes them at launch, and
# without that hint the weight loads compile to 4-byte loads instead of 16-byte ones.
DIV16_INTS = ("N", "K", "k_split", "stride_rm", "stride_om")


def loop_mix(cubin: bytes) -> str:
    """Instruction count of the longest loop in the SASS and its five most frequent opcodes."""
    cuobjdump = os.path.join(os.path.dirname(nv_compiler.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
             and int(m.group(1), 16) < a]
    if not loops:
        return "no loop"
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                              for a, t in ins if lo <= a <= hi)
    return f"{sum(ops.values())}: " + " ".join(f"{k} {v}" for k, v in ops.most_common(5))


def resources(kernel, constexprs: dict, num_warps: int = 4, types: dict | None = None, div16=DIV16_INTS,
              num_stages: int | None = None) -> tuple[int, int, int, str]:
    """(registers per thread, spill store bytes, shared memory bytes, loop_mix) of `kernel` for sm_90a.
    types: pointer types other than the GEMV's (fp32 unless named here); div16: the integer arguments
    that are multiples of 16."""
    names = kernel.arg_names
    consts = {n: v for n, v in constexprs.items() if n in names}
    ptr_types = {"qw_ptr": "*i32", "cnt_ptr": "*i32", "ids_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16",
                 **(types or {})}

    def arg_type(n):
        if n in consts:
            return "constexpr"
        if n.endswith("_ptr"):
            return ptr_types.get(n, "*fp32")
        return "fp32" if n == "eps" else "i32"

    src = ASTSource(kernel, {n: arg_type(n) for n in names},
                    constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                           if n.endswith("_ptr") or n in div16})
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(nv_compiler.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return regs, spills, compiled.metadata.shared, loop_mix(compiled.asm["cubin"]) + async_copies(compiled.asm["ptx"])


def async_copies(ptx: str) -> str:
    """The kernel's global-to-shared async copies by size (16-byte ones are the aligned, full-width kind)."""
    copy = r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+)"  # [dst], [src], size
    sizes = collections.Counter(int(b, 16) for b in re.findall(copy, ptx))
    return "".join(f"; cp.async {n}x{b}B" for b, n in sorted(sizes.items()))


# The prefill GEMM at a 512-token chunk, Qwen3-8B: (name, N out, K, gated, x dtype)
GEMM_CASES = [("qkv", 6144, 4096, False, "fp16"), ("o", 4096, 4096, False, "fp32"),
              ("gate_up", 12288, 4096, True, "fp16"), ("down", 4096, 12288, False, "fp32")]


def gemm_main():
    """The prefill GEMM's resources at pick_tiles()' choice for each GEMM_CASES call, q4 group 32."""
    import torch
    import triton.language as tl

    from ingot.backends.cuda import gemm
    from ingot.quant.pack import PackedLinear

    print(f"{'case':8s} {'tiles':34s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s}  main loop")
    for name, n_out, k, gated, x_dtype in GEMM_CASES:
        rows = 2 * n_out if gated else n_out
        w = PackedLinear("q4", rows, k, 32, torch.zeros(rows, k // 2, dtype=torch.uint8),
                         torch.zeros(rows, k // 32, dtype=torch.float16))
        cfg = dict(gemm.pick_tiles(512, n_out, k, "q4", 32, gated, 4 if x_dtype == "fp32" else 2))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        _, _, flags = gemm.weight_operands(w, cfg["BLOCK_K"])
        c = dict(cfg, **flags, ACT=1 if gated else 0, HAS_RES=not gated and name in ("o", "down"),
                 DOT=tl.float16, SPLIT=0)
        regs, spills, smem, mix = resources(
            gemm._gemm_kernel, c, warps, types={"x_ptr": "*" + x_dtype, "qw_ptr": "*u8", "mn_ptr": "*fp16"},
            div16=("M", "N_OUT", "K", "k_split", "stride_xm", "stride_qn", "stride_sn", "stride_rm", "stride_om"),
            num_stages=stages)
        tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{warps} s{stages} swap{cfg.get('SWAP', 0)}"
        print(f"{name:8s} {tiles:34s} {regs:5d} {spills:8d} {smem:7d}  {mix}", flush=True)


def moe_main():
    """The MoE kernels at Qwen3-30B-A3B's shapes: the prefill grouping (512 and 2,048 tokens), the byte decode
    kernels at their default tiles and at all of K in one step (moe_check's variants), and the q4 grouped
    GEMM at prefill_tiles' choice, at 32 rows (the choice at 512 tokens until 2026-12-04) and at 32 rows
    transposed (SWAP)."""
    import torch
    import triton.language as tl

    from ingot.backends.cuda import gemm, gemv, moe
    from ingot.quant.pack import PackedLinear

    print(f"{'kernel':9s} {'case':36s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s}  main loop")

    def row(label, name, kernel, c, warps=4, types=None, div16=(), stages=None):
        regs, spills, smem, mix = resources(kernel, c, warps, types=types, div16=div16, num_stages=stages)
        print(f"{label:9s} {name:36s} {regs:5d} {spills:8d} {smem:7d}  {mix}", flush=True)

    ints = {n: "*i32" for n in ("ids_ptr", "slot_ptr", "tile_expert_ptr", "rank_ptr", "hist_ptr", "base_ptr")}
    for tokens in (512, 2048):
        c = moe.group_constexprs(tokens * 8, 128, moe.prefill_tiles("q4", 32, False)["BLOCK_M"])
        row("grouping", f"{tokens} tokens", moe._group_kernel, c, warps=8, types=ints)
    byte = {"qw_ptr": "*u8", "ids_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16"}
    for bn, bk in ((moe.GATE_UP_BLOCK_N, 256), (2, 2048), (1, 2048)):
        c = dict(TOP_K=8, KIND=gemv.KIND_IDS["q4"], GROUP=32, HAS_MIN=False, ACT=1, NORMED=True, PARTS_BLOCK=256,
                 BLOCK_N=bn, BLOCK_K=bk, PDL=True, EARLY=True)
        row("byte", f"q4 gate/up {bn} rows x K step {bk}", moe._expert_gate_up_kernel, c, types=byte,
            div16=("F", "K", "stride_xm"))
    for bn, bk in ((moe.DOWN_BLOCK_N, moe.DOWN_BLOCK_K), (1, 1024)):
        c = dict(TOP_K=8, KP=8, KIND=gemv.KIND_IDS["q4"], GROUP=32, HAS_MIN=False, HAS_RES=True, NORM_OUT=True,
                 BLOCK_N=bn, BLOCK_K=bk, PDL=True, EARLY=True)
        row("byte", f"q4 down {bn} row(s) x 8 experts x K {bk}", moe._expert_down_kernel, c, types=byte,
            div16=("N", "K", "stride_rm", "stride_om"))
    grouped = {"x_ptr": "*fp16", "qw_ptr": "*u8", "mn_ptr": "*fp16", "pair_ptr": "*i32", "tile_expert_ptr": "*i32"}
    for name, gated, n_out, k in (("gate/up", True, 768, 2048), ("down", False, 2048, 768)):
        rows = 128 * (2 * n_out if gated else n_out)
        w = PackedLinear("q4", rows, k, 32, torch.zeros(rows, k // 2, dtype=torch.uint8),
                         torch.zeros(rows, k // 32, dtype=torch.float16))
        for extra in (dict(), dict(BLOCK_M=32), dict(BLOCK_M=32, SWAP=1)):
            cfg = {"SWAP": 0, **moe.prefill_tiles("q4", 32, gated), **extra}
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            c = dict(cfg, **gemm.weight_operands(w, cfg["BLOCK_K"])[2], TOP_K=8, GATHER=gated, SCATTER=not gated,
                     ACT=1 if gated else 0, DOT=tl.float16)
            label = f"q4 {name} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{warps} swap{cfg['SWAP']}"
            row("grouped", label, moe._grouped_gemm_kernel, c, warps,
                types={**grouped, "out_ptr": "*fp16" if gated else "*fp32"}, stages=stages,
                div16=("N_OUT", "K", "ROWS_PER_EXPERT", "stride_xm", "stride_qn", "stride_sn", "stride_om"))


def main():
    args = sys.argv[1:]
    mode = next((a for a in args if a in ("--gemm", "--moe")), None)
    args = [a for a in args if a != mode]
    if args:
        sys.path.insert(0, os.path.abspath(args[0]))
    if mode == "--gemm":
        gemm_main()
        return
    if mode == "--moe":
        moe_main()
        return
    from ingot.backends.cuda import gemv, moe

    print(f"{'kernel':7s} {'case':28s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s} {'programs/SM':>12s}  main loop")

    def row(label, name, kernel, c):
        regs, spills, smem, mix = resources(kernel, c)
        print(f"{label:7s} {name:28s} {regs:5d} {spills:8d} {smem:7d} {65536 // (128 * regs):12d}  {mix}", flush=True)

    for name, case in CASES:
        for label, kernel, extra in (("word", gemv._gemv_word_kernel, dict(UNPACK=1, ASM=True, EVEN=True)),
                                     ("word-u2", gemv._gemv_word_kernel, dict(UNPACK=2, ASM=True, EVEN=True)),
                                     ("dp4a", gemv._gemv_dp4a_kernel, dict(ASM=True))):
            c = {**COMMON, "SIGNED": case["WIDTH"] == 8, **case, **extra}
            if label == "word-u2" and c["WIDTH"] != 4:
                continue  # fp16 pairs: q4 only
            if label == "dp4a" and c["WIDTH"] == 4:
                c["BLOCK_N"] = 64  # _plan_dp4a's q4 tiles
            row(label, name, kernel, c)
    if hasattr(moe, "_expert_word_kernel"):  # trees before the word MoE decode lack it
        for name, case in MOE_CASES:
            c = dict(TOP_K=8, GROUP=32, HAS_MIN=False, SIGNED=case["WIDTH"] == 8, UNPACK=1, EVEN=True, NORM_OUT=False,
                     NORMED=False, PARTS_BLOCK=16, PDL=True, EARLY=True, **case)
            row("moe", name, moe._expert_word_kernel, c)
    # the router at Qwen3-30B-A3B's shapes (128 experts, top-8, hidden 2048), as moe.route launches it
    for t, name in ((1, "router, one row"), (8, "router, 8 rows"), (512, "router, 512 rows")):
        bt, be, bk = moe._router_tiles(t, 128, 2048)
        c = dict(TOP_K=8, KP=8, NORM_TOPK=True, EXPERT_SCALE=False, NORMED=t == 1, PARTS_BLOCK=32, E_ALL=128,
                 BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, ONE_TILE=bk >= 2048, RANK_BLOCK=16, DOT=moe.ROUTER_DOT,
                 PDL=True, EARLY=True)
        if "ONE_TILE" in moe._router_kernel.arg_names:  # trees before the one-row router lack it
            row("moe", name, moe._router_kernel, c)


if __name__ == "__main__":
    main()
