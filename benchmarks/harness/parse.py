"""Readers of each engine's benchmark output, all into one row shape.

A row: engine, engine_version, model, quant, bits_per_weight, test ("pp512" / "tg128"), tok_s, sd, n (number
of timed repetitions), bytes_per_token (weight bytes one decode step reads; tg rows only), note.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics

ROW_FIELDS = ["engine", "engine_version", "model", "quant", "bits_per_weight", "test", "tok_s", "sd", "n",
              "bytes_per_token", "note"]


def _row(**kw) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(kw)
    return row


def _mean_sd(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), (statistics.stdev(samples) if len(samples) > 1 else 0.0)


def llama_bench(text: str, model: str, quant: str, bytes_per_token: int | None = None,
                version: str | None = None) -> list[dict]:
    """`llama-bench ... -o json` output: one row per test. version: what to record where the build has no
    git commit of its own (a tree from the llama-cpp-python sdist reports "unknown")."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in the llama-bench output")
    rows = []
    for r in json.loads(text[start:]):
        pp, tg = int(r["n_prompt"]), int(r["n_gen"])
        if pp and tg:
            raise ValueError(f"llama-bench test with both n_prompt={pp} and n_gen={tg} is not pp or tg")
        test = (f"pp{pp}" if pp else f"tg{tg}") + (f" @ d{r['n_depth']}" if r.get("n_depth") else "")
        samples = [float(x) for x in r.get("samples_ts") or []]
        note = None
        if test.startswith("pp") and samples:
            # Its first prefill repetition runs slow (about 35% here); the mean keeps it, the note says so.
            note = f"first repetition {samples[0] / statistics.fmean(samples):.2f} of the mean"
        rows.append(_row(
            engine="llama.cpp", engine_version=version or f"{r.get('build_commit')} (b{r.get('build_number')})",
            model=model, quant=quant, bits_per_weight=8 * int(r["model_size"]) / int(r["model_n_params"]),
            test=test, tok_s=float(r["avg_ts"]), sd=float(r["stddev_ts"]), n=len(samples) or None,
            bytes_per_token=bytes_per_token if test.startswith("tg") else None, note=note))
    return rows


_TRIAL = re.compile(r"^Trial \d+:\s+prompt_tps=([\d.]+), generation_tps=([\d.]+)", re.M)
_TIMING = re.compile(r"prompt_tokens=(\d+), generation_tokens=(\d+)")
_BPW = re.compile(r"Quantized model with ([\d.]+) bits per weight")


def mlx_benchmark(text: str, model: str, quant: str, version: str, bits_per_weight: float | None = None,
                  bytes_per_token: int | None = None) -> list[dict]:
    """`mlx_lm benchmark` output: the per-trial prompt_tps / generation_tps lines -> a pp and a tg row.

    Its decode runs after the prompt (tg128 at depth 512), where llama-bench and ingot bench start from an
    (almost) empty cache; at these sizes attention over 512 tokens is a small part of a decode step."""
    timing = _TIMING.search(text)
    trials = _TRIAL.findall(text)
    if not timing or not trials:
        raise ValueError("no 'Timing with' / 'Trial N:' lines in the mlx_lm benchmark output")
    pp, tg = int(timing.group(1)), int(timing.group(2))
    rows = []
    for test, samples in ((f"pp{pp}", [float(a) for a, _ in trials]), (f"tg{tg}", [float(b) for _, b in trials])):
        mean, sd = _mean_sd(samples)
        rows.append(_row(engine="mlx", engine_version=version, model=model, quant=quant,
                         bits_per_weight=bits_per_weight, test=test, tok_s=mean, sd=sd, n=len(samples),
                         bytes_per_token=bytes_per_token if test.startswith("tg") else None,
                         note=f"tg after the {pp}-token prompt" if test.startswith("tg") else None))
    return rows


def mlx_convert_bits(text: str) -> float | None:
    """The bits per weight `mlx_lm convert` reports for the model it wrote."""
    m = _BPW.search(text)
    return float(m.group(1)) if m else None


def ingot_bench(text: str, model: str, quant: str) -> tuple[list[dict], float | None]:
    """`ingot bench ... --roofline -o csv` output -> rows and the copy bandwidth (bytes/s) it measured."""
    rows, copy_bw = [], None
    reader = csv.DictReader(io.StringIO(text[text.find("date,"):] if "date," in text else ""))
    for r in reader:
        bpt = int(r["bytes_per_token"]) if r.get("bytes_per_token") else None
        if r.get("copy_bw_bytes_s"):
            copy_bw = float(r["copy_bw_bytes_s"])
        rows.append(_row(engine="ingot", engine_version=f"{r['ingot_version']} ({r['commit']})", model=model,
                         quant=quant, bits_per_weight=8 * int(r["size_bytes"]) / int(r["params"]), test=r["test"],
                         tok_s=float(r["tps_mean"]), sd=float(r["tps_sd"]), n=int(r["reps"]),
                         bytes_per_token=bpt))
    if not rows:
        raise ValueError("no CSV rows (header 'date,...') in the ingot bench output")
    return rows, copy_bw
