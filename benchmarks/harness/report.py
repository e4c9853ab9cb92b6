"""Collect the engines' results into one CSV, a markdown table of ratios and bar charts.

    python benchmarks/harness/report.py add ROWS.csv ENGINE MODEL QUANT RAW [--version V] [--bits B]
                                        [--bytes-per-token N]
    python benchmarks/harness/report.py write ROWS.csv --out DIR [--gpu NAME] [--date YYYY-MM-DD]

`add` parses one engine's raw output (parse.py) and appends its rows; `write` makes
DIR/<date>-<gpu>.csv, DIR/<date>-<gpu>.md (the ratio table) and DIR/<date>-<gpu>-{decode,prefill}.png.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from datetime import date as _date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parse  # noqa: E402

ENGINES = ("ingot", "llama.cpp", "mlx")
RESULT_FIELDS = ["date", "gpu", "engine", "engine_version", "model", "quant", "bits_per_weight", "test", "tok_s",
                 "sd", "n", "bytes_per_token", "bw_share", "note"]


def quant_bits(quant: str) -> int:
    """The weight bit width a quant name stands for: Q4_0 -> 4, 'mlx q8 g64' -> 8 (what pairs engines)."""
    m = re.search(r"q(\d+)", quant.lower())
    if not m:
        raise ValueError(f"cannot tell the bit width of quant {quant!r}")
    return int(m.group(1))


def add(rows_csv: Path, engine: str, model: str, quant: str, raw: Path, version: str | None = None,
        bits: float | None = None, bytes_per_token: int | None = None) -> list[dict]:
    text = raw.read_text(encoding="utf-8", errors="replace")
    copy_bw = None
    if engine == "llama.cpp":
        rows = parse.llama_bench(text, model, quant, bytes_per_token, version)
    elif engine == "mlx":
        rows = parse.mlx_benchmark(text, model, quant, version or "?", bits, bytes_per_token)
    elif engine == "ingot":
        rows, copy_bw = parse.ingot_bench(text, model, quant)
    else:
        raise ValueError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    for r in rows:
        r["copy_bw_bytes_s"] = copy_bw
    new = not rows_csv.exists() or rows_csv.stat().st_size == 0
    with open(rows_csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=parse.ROW_FIELDS + ["copy_bw_bytes_s"], lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)
    return rows


def _num(v):
    return float(v) if v not in (None, "") else None


def results(rows: list[dict], gpu: str, day: str) -> list[dict]:
    """The published rows: share of copy bandwidth from the copy bandwidth Ingot measured in the same run."""
    copy = [_num(r.get("copy_bw_bytes_s")) for r in rows if _num(r.get("copy_bw_bytes_s"))]
    copy_bw = max(copy) if copy else None
    out = []
    for r in rows:
        tok_s, bpt = _num(r["tok_s"]), _num(r.get("bytes_per_token"))
        bpw = _num(r.get("bits_per_weight"))
        out.append({
            "date": day, "gpu": gpu, "engine": r["engine"], "engine_version": r["engine_version"],
            "model": r["model"], "quant": r["quant"], "bits_per_weight": f"{bpw:.2f}" if bpw else "",
            "test": r["test"], "tok_s": f"{tok_s:.1f}", "sd": f"{_num(r['sd']):.1f}", "n": r.get("n") or "",
            "bytes_per_token": int(bpt) if bpt else "",
            "bw_share": f"{bpt * tok_s / copy_bw:.3f}" if bpt and copy_bw else "", "note": r.get("note") or ""})
    return out


def _table(res: list[dict]) -> list[dict]:
    """One line per (model, bit width, test) with each engine's figure."""
    lines: dict[tuple, dict] = {}
    for r in res:
        key = (r["model"], quant_bits(r["quant"]), r["test"])
        line = lines.setdefault(key, {"model": key[0], "bits": key[1], "test": key[2]})
        line[r["engine"]] = r
    return [lines[k] for k in sorted(lines, key=lambda k: (k[0], k[1], k[2][:2] != "pp", k[2]))]


def markdown(res: list[dict]) -> str:
    head = ("| model | weights | test | Ingot tok/s | llama.cpp tok/s | MLX tok/s | Ingot ÷ llama.cpp | Ingot ÷ MLX "
            "| bits/weight (GGUF · MLX) |\n|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for line in _table(res):
        def tps(engine):
            r = line.get(engine)
            return f"{float(r['tok_s']):,.0f} ± {float(r['sd']):,.0f}" if r else "—"

        def ratio(engine):
            a, b = line.get("ingot"), line.get(engine)
            return f"{float(a['tok_s']) / float(b['tok_s']):.2f}" if a and b else "—"

        gguf = (line.get("ingot") or line.get("llama.cpp") or {}).get("bits_per_weight") or "—"
        mlx = (line.get("mlx") or {}).get("bits_per_weight") or "—"
        out.append(f"| {line['model']} | {line['bits']}-bit | {line['test']} | {tps('ingot')} | {tps('llama.cpp')} "
                   f"| {tps('mlx')} | {ratio('llama.cpp')} | {ratio('mlx')} | {gguf} · {mlx} |")
    return "\n".join(out) + "\n"


def charts(res: list[dict], stem: Path) -> list[Path]:
    """<stem>-decode.png and <stem>-prefill.png: tok/s per model and bit width, one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind, title in (("tg", "decode"), ("pp", "prefill")):
        lines = [ln for ln in _table(res) if ln["test"].startswith(kind)]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(lines)), 4.0))
        width = 0.27
        for i, engine in enumerate(ENGINES):
            xs = [j + (i - 1) * width for j, ln in enumerate(lines) if engine in ln]
            ys = [float(ln[engine]["tok_s"]) for ln in lines if engine in ln]
            es = [float(ln[engine]["sd"]) for ln in lines if engine in ln]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=engine)
        ax.set_xticks(range(len(lines)), [f"{ln['model']}\n{ln['bits']}-bit" for ln in lines], fontsize=7)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title} ({lines[0]['test']}), batch 1, {res[0]['gpu']}")
        ax.legend()
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{title}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def gpu_slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", gpu) if w and w.upper() != "NVIDIA"]
    return words[0].lower() if words else "gpu"


def write(rows_csv: Path, out: Path, gpu: str, day: str) -> list[Path]:
    with open(rows_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{rows_csv}: no results")
    res = results(rows, gpu, day)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{day}-{gpu_slug(gpu)}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(res)
    stem.with_suffix(".md").write_text(markdown(res), encoding="utf-8")
    written = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    try:
        written += charts(res, stem)
    except ImportError:
        print("matplotlib is not installed: no charts (run `report.py write` where it is)", file=sys.stderr)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="parse one engine's raw output and append its rows")
    a.add_argument("rows", type=Path)
    a.add_argument("engine", choices=ENGINES)
    a.add_argument("model")
    a.add_argument("quant")
    a.add_argument("raw", type=Path)
    a.add_argument("--version")
    a.add_argument("--bits", type=float)
    a.add_argument("--bytes-per-token", type=int)
    w = sub.add_parser("write", help="results CSV, ratio table and charts")
    w.add_argument("rows", type=Path)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--gpu", default="gpu")
    w.add_argument("--date", default=_date.today().isoformat())
    args = p.parse_args(argv)
    if args.cmd == "add":
        for r in add(args.rows, args.engine, args.model, args.quant, args.raw, args.version, args.bits,
                     args.bytes_per_token):
            print(f"{r['engine']:9} {r['model']:14} {r['quant']:12} {r['test']:6} {r['tok_s']:10.1f} ± {r['sd']:.1f}")
    else:
        for path in write(args.rows, args.out, args.gpu, args.date):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
