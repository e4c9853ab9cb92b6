"""Load generator for OpenAI-compatible servers (Ingot's `ingot serve`, llama.cpp's `llama-server`): output
tokens per second and time to first token at a number of concurrent streams.

    python3 benchmarks/serve_bench.py URL --streams 1 8 32 [--prompt-tokens 512] [--max-tokens 128]
                                      [--requests-per-stream 2] [--engine NAME] [--csv OUT.csv]

Every request is a streaming POST /v1/completions of the same-length prompt (distinct text per request, so
no prefix cache helps), `max_tokens` answer tokens with `ignore_eos` (llama-server honours it; Ingot ignores
unknown fields, and random-weight models rarely stop early), and `stream_options.include_usage` for exact
token counts. Each stream sends its requests one after another; all streams start together. Output tok/s =
all answer tokens ÷ wall time from the first request sent to the last response finished; TTFT = send to the
first streamed token. The prompt length is set in words, scaled once by the token count the server reports for a
warm-up request. Before each level's timed requests, `streams` concurrent warm-up requests of the same prompt
length (16 answer tokens) let a server compile or tune for that batch shape outside the measurement, as
llama-bench's and `ingot bench`'s warm-up runs do.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import sys
import time

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain garden window letter music paper").split()


def prompt_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0,
            "completion_tokens": usage["completion_tokens"] if usage else chunks,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


async def run_level(url: str, streams: int, per_stream: int, prompt_words: int, max_tokens: int,
                    seed: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]  # the name the server wants
        # warm-up, and the words-per-token ratio of this server's tokenizer from its usage counts; the probe
        # is an eighth of the target, so a tokenizer of several tokens per word (Qwen3-8B's synthetic GGUF:
        # 3.4) still fits the context
        probe_words = max(1, prompt_words // 8)
        probe = await one_request(client, url, model, prompt_text(probe_words, seed - 1), 8)
        if probe["prompt_tokens"]:
            prompt_words = max(1, round(prompt_words * probe_words / probe["prompt_tokens"]))

        async def stream(i):
            return [await one_request(client, url, model, prompt_text(prompt_words, seed + i * per_stream + j), max_tokens)
                    for j in range(per_stream)]

        await asyncio.gather(*(one_request(client, url, model, prompt_text(prompt_words, -2 - i), 16)
                               for i in range(streams)))
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(i) for i in range(streams))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    prompts = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    return {"streams": streams, "requests": len(results), "output_tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft),
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
            "completion_tokens": tokens, "prompt_tokens_mean": statistics.mean(prompts) if prompts else None,
            "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=512, help="about this many prompt tokens (as words)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--engine", default="", help="label for the CSV")
    ap.add_argument("--model", default="", help="label for the CSV")
    ap.add_argument("--csv", help="append one row per level to this CSV")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for n in args.streams:
        r = asyncio.run(run_level(args.url.rstrip("/"), n, args.requests_per_stream, args.prompt_tokens,
                                  args.max_tokens, args.seed + 1000 * n))
        r = {"engine": args.engine, "model": args.model, **r}
        rows.append(r)
        print(f"{args.engine:10s} {args.model:16s} streams {n:3d}  {r['output_tok_s']:9.1f} tok/s  "
              f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms  p99 {r['ttft_p99_ms']:8.1f} ms  "
              f"(prompt ~{r['prompt_tokens_mean']} tokens, {r['completion_tokens']} out)", flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
