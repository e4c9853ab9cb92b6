"""One Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts, top-8, expert width 768) on the H100: correctness
against an fp32 torch MoE and timings of the decode and prefill MoE blocks, at Q4_0 and Q8_0.

Correctness: 1 and 7 rows (the selected-experts decode path, on both of its schemes, "byte" and "word":
INGOT_MOE_DECODE), 512 and 2048 rows (the grouped GEMMs). The
router is checked against fp32 torch (softmax, top-8, renormalised); the expert part against fp32 torch on
the dequantized weights, using the kernel's own expert choice so that a near tie in the router cannot
swap an expert and fail the comparison for a reason that is not an error. Pass: relative error (norm) under
1e-2, fp16 tolerance.

Timings: decode block at 1 and 8 rows as CUDA-graph replays over 32 distinct inputs (different experts
each launch, so the 50 MB L2 cannot hold the active experts), with GB/s = bytes of the router and the 8
active experts per row / time (1 row); a few block_n variants of each decode scheme's kernels (CSV column
`variant`: "byte (16, 8)", "word (32, 64)", ...), and the byte kernels' K steps. The router alone at 1 and
512 rows, and at 512 over prefill tile shapes and both dots. Prefill block at 512 and 2048 rows as CUDA-graph
replays (4 calls a graph, median of 7; host launches stay out), with a few tile variants at 512.

    python benchmarks/moe_check.py --out DIR        # ~2-3 minutes on the H100
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from graph_timing import time_graph  # noqa: E402

from ingot.backends.cuda import moe  # noqa: E402
from ingot.bench.roofline import copy_bandwidth  # noqa: E402
from ingot.quant import pack  # noqa: E402

H, E, FF, TOP_K, EPS = 2048, 128, 768, 8, 1e-6
QUANTS = {"q4_0": dict(kind="q4", sym=True), "q8_0": dict(kind="q8", sym=True)}


def make_layer(quant: str, dev, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    spec = QUANTS[quant]

    def packed(n, k):
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        return pack.quantize(w, spec["kind"], group=32, sym=spec["sym"])

    gate_up = pack.interleave_rows([packed(E * FF, H), packed(E * FF, H)], E)
    down = packed(E * H, FF)
    router = torch.randn(E, H, device=dev, generator=g) * 0.05
    norm_weight = torch.rand(H, device=dev, generator=g) + 0.5
    return moe.MoEWeights(router, gate_up, down, TOP_K, True), norm_weight


def reference(x, w: moe.MoEWeights, nw, gu, down, ids):
    """fp32 torch: routing weights from softmax/top-k over all experts, experts as the kernel chose them."""
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * nw
    probs = (xn @ w.router.float().T).softmax(-1)
    ref_w, ref_ids = probs.topk(TOP_K, dim=-1)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    weights = probs.gather(1, ids.long())
    weights = weights / weights.sum(-1, keepdim=True)
    out = x.clone()
    for e in ids.unique().tolist():
        rows, choice = (ids == e).nonzero(as_tuple=True)
        h = F.silu(xn[rows] @ gu[e, :FF].T) * (xn[rows] @ gu[e, FF:].T)
        out.index_add_(0, rows, (h @ down[e].T) * weights[rows, choice, None])
    return out, ref_ids, ref_w


@contextlib.contextmanager
def decode_scheme(scheme: str):
    """moe's decode experts on `scheme` ("byte" | "word", as INGOT_MOE_DECODE would set it) inside."""
    saved, moe.DECODE = moe.DECODE, scheme
    try:
        yield
    finally:
        moe.DECODE = saved


@contextlib.contextmanager
def moe_settings(**values):
    """moe's module settings (GATE_UP_BLOCK_K, DOWN_BLOCK_K, WORD_GATE_UP_SPLIT, ...) at these values inside."""
    saved = {k: getattr(moe, k) for k in values}
    for k, v in values.items():
        setattr(moe, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(moe, k, v)


def check(quant, w, nw, dev, rows_out):
    gu = w.gate_up.dequantize().view(E, 2 * FF, H)
    down = w.down.dequantize().view(E, H, FF)
    ok = True
    for t in (1, 7, 512, 2048):
        x = torch.randn(t, H, device=dev)
        ids, wts = moe.route(x, w, nw, EPS)
        want, ref_ids, ref_w = reference(x, w, nw, gu, down, ids)
        same_set = (ids.long().sort(-1).values == ref_ids.sort(-1).values).all(-1)
        path = "decode" if t <= moe.MAX_DECODE_ROWS else "prefill"
        # decode: both schemes, and the word one with its gate/up split over K ("word/4")
        for scheme in ("byte", "word", "word/4") if path == "decode" else (None,):
            with decode_scheme((scheme or moe.DECODE).split("/")[0]), \
                    moe_settings(WORD_GATE_UP_SPLIT=int(scheme.split("/")[1]) if "/" in (scheme or "") else 1):
                got = moe.block(x.clone(), w, nw, EPS)
            torch.cuda.synchronize()
            err = float((got - want).norm() / (want - x).norm())  # relative to the MoE output itself
            werr = float((wts - ref_w).abs().max())
            passed = err < 1e-2 and werr < 1e-4 and float(same_set.float().mean()) > 0.99
            ok &= passed
            variant = scheme or "grouped"
            print(f"  {quant} T={t:5d} ({path} {variant}): rel err {err:.2e}, router: {int(same_set.sum())}/{t} "
                  f"rows pick the reference's experts, max weight err {werr:.1e}  {'PASS' if passed else 'FAIL'}")
            rows_out.append(dict(what="check", quant=quant, rows=t, path=path, variant=variant, rel_err=f"{err:.3e}",
                                 router_rows_same=int(same_set.sum()), weight_err=f"{werr:.2e}", passed=passed))
    del gu, down
    return ok


def time_decode(quant, w, nw, dev, bw, rows_out):
    active = w.active_bytes()
    # block_n (gate/up, down) of each scheme: its default first (see decode_block for what they count)
    schemes = {"byte": [(moe.GATE_UP_BLOCK_N, moe.DOWN_BLOCK_N), (16, 8), (32, 8), (16, 4), (8, 4), (4, 8), (4, 4)],
               "word": [(moe.WORD_GATE_UP_BLOCK_N, moe.WORD_DOWN_BLOCK_N), (16, 64), (64, 64), (32, 32),
                        (32, 128), (16, 32), (8, 64), (8, 32)]}
    for t in (1, 8):
        xs = [torch.randn(t, H, device=dev) for _ in range(32)]
        for scheme, variants in schemes.items():
            for bn in variants if t == 1 else variants[:1]:
                buffers = moe.DecodeBuffers.for_layers([w], t, dev)
                with decode_scheme(scheme):  # the graph captures the scheme's kernels
                    sec = time_graph(lambda i: moe.decode_block(xs[i % 32], w, nw, EPS, buffers=buffers,
                                                                block_n=bn), launches=32, trials=11)
                gbps = active / sec / 1e9 if t == 1 else float("nan")
                share = (f", {gbps:6.0f} GB/s of {active / 1e6:.1f} MB ({gbps * 1e9 / bw:.0%} of copy)"
                         if t == 1 else "")
                print(f"  {quant} decode T={t} {scheme} block_n={bn}: {sec * 1e6:7.1f} us{share}")
                rows_out.append(dict(what="decode", quant=quant, rows=t, variant=f"{scheme} {bn}",
                                     us=f"{sec * 1e6:.2f}", active_mb=f"{active / 1e6:.2f}", gbps=f"{gbps:.0f}"))
        # the byte kernels' K steps (gate/up's, down's cap: more bytes a program in flight against more
        # registers), at their default block_n or the one given, down to all of K in one step (one DRAM
        # round trip a program: gate/up at 2 x 2048 is 95 registers, down at 1 x 1024 128; ptxas sm_90a), and
        # the word gate/up split over K (more programs)
        settings = [("byte", dict(GATE_UP_BLOCK_K=512, DOWN_BLOCK_K=128), None),
                    ("byte", dict(GATE_UP_BLOCK_K=256, DOWN_BLOCK_K=256), None),
                    ("byte", dict(GATE_UP_BLOCK_K=512, DOWN_BLOCK_K=256), None),
                    ("byte", dict(GATE_UP_BLOCK_K=1024), (2, moe.DOWN_BLOCK_N)),
                    ("byte", dict(GATE_UP_BLOCK_K=2048), (2, moe.DOWN_BLOCK_N)),
                    ("byte", dict(GATE_UP_BLOCK_K=2048), (1, moe.DOWN_BLOCK_N)),
                    ("byte", dict(DOWN_BLOCK_K=256), (moe.GATE_UP_BLOCK_N, 4)),
                    ("byte", dict(DOWN_BLOCK_K=512), (moe.GATE_UP_BLOCK_N, 2)),
                    ("byte", dict(DOWN_BLOCK_K=1024), (moe.GATE_UP_BLOCK_N, 1)),
                    ("byte", dict(GATE_UP_BLOCK_K=2048, DOWN_BLOCK_K=1024), (2, 1)),
                    ("word", dict(WORD_GATE_UP_SPLIT=2), None), ("word", dict(WORD_GATE_UP_SPLIT=4), None)]
        for scheme, setting, bn in settings if t == 1 else []:
            with decode_scheme(scheme), moe_settings(**setting):
                buffers = moe.DecodeBuffers.for_layers([w], t, dev)  # after the split is set: its workspace
                sec = time_graph(lambda i: moe.decode_block(xs[i % 32], w, nw, EPS, buffers=buffers, block_n=bn),
                                 launches=32, trials=11)
            label = f"{scheme} " + " ".join(f"{k}={v}" for k, v in setting.items()) + (f" block_n={bn}" if bn else "")
            print(f"  {quant} decode T=1 {label}: {sec * 1e6:7.1f} us, {active / sec / 1e9:6.0f} GB/s")
            rows_out.append(dict(what="decode", quant=quant, rows=t, variant=label, us=f"{sec * 1e6:.2f}",
                                 active_mb=f"{active / 1e6:.2f}", gbps=f"{active / sec / 1e9:.0f}"))
    for t in (1, 512):  # the decode tiles and the prefill (tl.dot) tiles
        xs = [torch.randn(t, H, device=dev) for _ in range(32)]
        ids = torch.empty(t, TOP_K, device=dev, dtype=torch.int32)
        weights, logits = torch.empty(t, TOP_K, device=dev), torch.empty(t, E, device=dev)
        counters = torch.zeros(t, device=dev, dtype=torch.int32)

        def timed():
            return time_graph(lambda i: moe.route(xs[i % 32], w, nw, EPS, ids=ids, weights=weights, logits=logits,
                                                  counters=counters), launches=32, trials=11)
        sec = timed()
        print(f"  {quant} router alone T={t}: {sec * 1e6:.1f} us")
        rows_out.append(dict(what="router", quant=quant, rows=t, us=f"{sec * 1e6:.2f}"))
        if t == 1:
            continue
        # the prefill router's tiles and dot (84 us a layer at 512 rows, 2026-12-04); ptxas sm_90a, no spills at
        # these: ieee (16, 32, 128) 96 registers, (32, 16, 128) 116, (16, 16, 256) 167; tf32x3 (16, 32, 64) 128
        want = moe.route(xs[0], w, nw, EPS)
        for dot, tiles in [("ieee", (16, 32, 128)), ("ieee", (16, 16, 128)), ("ieee", (16, 16, 64)),
                           ("ieee", (32, 16, 128)), ("ieee", (16, 16, 256)), ("tf32x3", (16, 32, 64)),
                           ("tf32x3", (16, 16, 64))]:
            with moe_settings(ROUTER_DOT=dot, ROUTER_PREFILL_TILES=tiles):
                got_ids, got_w = moe.route(xs[0], w, nw, EPS)
                same = float((got_ids == want[0]).all(-1).float().mean())
                werr = float((got_w - want[1]).abs().max())
                sec = timed()
            label = f"prefill {dot} {tiles}"
            print(f"  {quant} router T={t} {label}: {sec * 1e6:.1f} us, rows as the default's {same:.3f}, "
                  f"weights within {werr:.1e}")
            rows_out.append(dict(what="router", quant=quant, rows=t, variant=label, us=f"{sec * 1e6:.2f}",
                                 router_rows_same=f"{same:.3f}", weight_err=f"{werr:.2e}"))


def time_prefill(quant, w, nw, dev, rows_out):
    kind = QUANTS[quant]["kind"]
    for t in (512, 2048):
        xs = [torch.randn(t, H, device=dev) for _ in range(2)]
        out = torch.empty(t, H, device=dev)  # x itself stays as drawn, and so do the experts it picks
        # around moe.prefill_tiles' choices (q4: 64 rows, 4 warps; q8: 64 x 128, 8 warps); q4's 32-row tiles
        # (its choice at 512 tokens until 2026-12-04) compile to mma.sync, 64 rows and up to wgmma
        variants = [None, dict(BLOCK_M=32), dict(BLOCK_M=128, num_warps=8)]
        if t == 512:
            bk = 128 if kind == "q4" else 64
            variants += [dict(BLOCK_M=32, BLOCK_N=128, num_warps=8), dict(BLOCK_M=32, BLOCK_K=2 * bk),
                         dict(BLOCK_M=64, BLOCK_K=2 * bk)]
            # transposed (SWAP): the weight tile is wgmma's register operand, so 32-row tiles run on wgmma
            variants += [dict(BLOCK_M=32, SWAP=1), dict(BLOCK_M=32, BLOCK_N=128, SWAP=1), dict(BLOCK_M=64, SWAP=1)]
        for tiles in variants:
            # from a CUDA graph, as the model's prefill runs: an eager call's ~10 launches (~25 before the
            # grouping kernel) cost host time that timed events count, whatever the tiles (before 2026-12-04,
            # these rows were such eager times: 1.0-1.5 ms a layer at 512 rows, tiles within noise)
            sec = time_graph(lambda i: moe.prefill_block(xs[i % 2], w, nw, EPS, tiles=tiles, out=out),
                             launches=4, trials=7)
            flop = 2 * t * TOP_K * 3 * FF * H
            gbps = (w.gate_up.nbytes + w.down.nbytes) / sec / 1e9  # every expert's weights, once
            print(f"  {quant} prefill T={t} tiles={tiles or 'default'}: {sec * 1e3:7.3f} ms, "
                  f"{t / sec:9.0f} rows/s, {flop / sec / 1e12:6.1f} TFLOP/s, {gbps:5.0f} GB/s of the weights")
            rows_out.append(dict(what="prefill", quant=quant, rows=t, variant=str(tiles or "default"),
                                 us=f"{sec * 1e6:.1f}", tflops=f"{flop / sec / 1e12:.2f}", gbps=f"{gbps:.0f}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in true fp32
    bw = copy_bandwidth(dev) or float("nan")
    print(f"{torch.cuda.get_device_name(dev)}, copy bandwidth {bw / 1e12:.3f} TB/s")
    rows, ok, start = [], True, time.time()
    for quant in QUANTS:
        w, nw = make_layer(quant, dev)
        print(f"{quant}: layer {(w.gate_up.nbytes + w.down.nbytes) / 1e6:.0f} MB, "
              f"active per row {w.active_bytes() / 1e6:.1f} MB")
        ok &= check(quant, w, nw, dev, rows)
        time_decode(quant, w, nw, dev, bw, rows)
        time_prefill(quant, w, nw, dev, rows)
        del w
        torch.cuda.empty_cache()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "moe_check.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    print(f"{'ALL PASS' if ok else 'SOME FAILED'} in {time.time() - start:.0f} s; {out / 'moe_check.csv'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
