"""Ingot and llama.cpp computing the same model: the perplexity each gives one GGUF on one text.

llama-perplexity's procedure, repeated on Ingot's logits: the text's tokens in chunks of --ctx, the first token
of a chunk made BOS where the vocabulary adds one, the chunk's second half scored (the logits at position j
against token j + 1), and the running perplexity printed after each chunk. A difference in any part of the model
(norms, rope, attention, activation, routing, tensor layout) moves every logit and so the perplexity; the two
engines' roundings (llama.cpp quantizes activations to 8 bits on the CPU) move it by well under 1% on dense
models. Random-weight MoE routers leave many near-ties between the k-th and (k+1)-th expert, so a rounding
can pick another expert: there a few percent is the noise floor, which --router-noise measures on Ingot
alone.

    python benchmarks/harness/ppl_check.py MODEL.gguf --llama-perplexity PATH/TO/llama-perplexity [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import ingot  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an which or are were be this had not but "
         "they have it one all their has been its can who more new also two first other after into time most only "
         "over some would states world city year years when no up about").split()


def text(n_words: int = 400, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def llama_cpp_ppl(binary: str, gguf: str, path: str, ctx: int, chunks: int, threads: int | None) -> list[float]:
    cmd = [binary, "-m", gguf, "-f", path, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks)]
    cmd += ["-t", str(threads)] if threads else ["-ngl", "99"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    values = [float(v) for v in re.findall(r"\[\d+\](\d+(?:\.\d+)?),", out.stdout + out.stderr)]
    if out.returncode != 0 or len(values) != chunks:
        raise SystemExit(f"llama-perplexity failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
    return values


def routers(m) -> list[torch.Tensor]:
    """The MoE router weights the backend computes with: the reference's per-layer dicts, CUDA's MoEWeights."""
    if m.backend.name == "reference":
        return [lw["ffn_gate_inp"] for lw in m.backend.layers if "ffn_gate_inp" in lw]
    return [lw.moe.router for lw in m.backend.w.layers if lw.moe]


def nudge_routers(m, scale: float, seed: int = 1) -> int:
    """Multiply every MoE router weight by 1 + scale * N(0, 1) in place; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    found = routers(m)
    for w in found:
        w.mul_(1 + scale * torch.randn(w.shape, generator=gen).to(w))
    return len(found)


def ingot_ppl(m, ids: list[int], ctx: int, chunks: int) -> list[float]:
    tok = m.tokenizer
    nll, count, running = 0.0, 0, []
    for c in range(chunks):
        seq = ids[c * ctx:(c + 1) * ctx]
        if tok.add_bos:
            seq[0] = tok.bos_id
        logp = torch.log_softmax(m.logits(seq).double(), -1)
        for j in range(ctx // 2, ctx - 1):
            nll -= logp[j, seq[j + 1]].item()
            count += 1
        running.append(math.exp(nll / count))
    return running


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--llama-perplexity", required=True, help="the llama-perplexity binary")
    ap.add_argument("--device", default=None, help="Ingot's device (default: cuda when a GPU is present)")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp on the CPU with this many threads (default: every layer on the GPU, -ngl 99)")
    ap.add_argument("--router-noise", type=float, default=0.0,
                    help="then run Ingot again with each MoE router weight scaled by 1 + this x N(0, 1) "
                         "(e.g. 0.003)")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)

    words = text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(words)
        # llama.cpp first, so that its copy of the model is gone before Ingot's (fp32 on the CPU) is made
        theirs = llama_cpp_ppl(args.llama_perplexity, args.gguf, str(path), args.ctx, args.chunks, args.threads)
    m = ingot.load(args.gguf, device=args.device, max_context=args.ctx, progress=False)
    ids = m.tokenizer.encode(words)
    ours = ingot_ppl(m, ids, args.ctx, args.chunks)
    row = {"gguf": Path(args.gguf).name, "device": str(m.device), "ctx": args.ctx, "llama.cpp": theirs,
           "ingot": ours, "final_ratio": ours[-1] / theirs[-1]}
    if args.router_noise:
        if not nudge_routers(m, args.router_noise):
            raise SystemExit(f"{args.gguf} has no MoE router to nudge")
        row["ingot_router_noise"] = ingot_ppl(m, ids, args.ctx, args.chunks)
    for name in [k for k in ("llama.cpp", "ingot", "ingot_router_noise") if k in row]:
        print(f"{name:>18}: " + "  ".join(f"[{i + 1}]{v:.6g}" for i, v in enumerate(row[name])))
    print(f"{'ingot / llama.cpp':>18}: {row['final_ratio']:.5f}")
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
