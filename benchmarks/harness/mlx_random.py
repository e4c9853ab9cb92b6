"""An MLX folder with random weights, quantized as `mlx_lm convert -q` quantizes, with no bf16 checkpoint on the way.

    python benchmarks/harness/mlx_random.py qwen3-30b-a3b --bits 4 -o /tmp/qwen3-30b-a3b-mlx-q4 [--layers N]

For Qwen3-30B-A3B, whose bf16 checkpoint (61 GB) does not fit the GPU machine's 64 GB disk beside its GGUFs,
the harness writes the MLX side this way instead of through hf_random.py and `mlx_lm convert`. The steps are
convert's, from a randomly initialised model instead of a loaded one: mlx_lm's own model class for the
config (hf_random.py's config.json and tokenizer), its floating parameters cast to bf16 (convert's dtype for
these checkpoints), mlx_lm.utils.quantize_model at group 64, and mlx_lm.utils.save. MLX evaluates lazily, so
each shard's weights are drawn and quantized as save writes that shard: the float model is never held whole.
The values are mlx's layer initialisations, not the GGUF's: speed depends on shapes and types, not values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm import utils

from hf_random import DiskSpaceError, hf_config, write_or_no_room, write_tokenizer
from ingot.bench.synthetic import _hf_config

GROUP = 64


def phase(name: str, since: float) -> float:
    """Print how long a phase took (stderr: the harness keeps it beside convert's output); returns now. The
    harness's device time goes mostly to MLX, so where it goes is logged."""
    now = time.perf_counter()
    print(f"mlx_random: {name} {now - since:.1f} s", file=sys.stderr, flush=True)
    return now


def write_mlx_random(key: str, folder, bits: int, layers: int | None = None, group: int = GROUP) -> Path:
    """Write model `key` (a key of ingot/bench/model_shapes.json) as a quantized MLX folder; returns it."""
    t = phase("imports", T0)
    cfg = _hf_config(key, layers)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:  # what save copies beside the weights: config and tokenizer
        src = Path(tmp)
        (src / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
        write_tokenizer(cfg, src)
        t = phase("config and tokenizer", t)
        config = utils.load_config(src)
        model_class, args_class = utils._get_classes(config)
        model = model_class(args_class.from_dict(config))
        cast = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(mx.bfloat16) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
        model, config = utils.quantize_model(model, config, group, bits)
        need = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
        if need > free:
            raise DiskSpaceError(f"{key}: the {bits}-bit MLX folder needs {need / 1e9:.1f} GB, "
                                 f"{free / 1e9:.1f} GB are free")
        t = phase("model built and quantized (lazily)", t)
        tokenizer = utils.load_tokenizer(src)
        t = phase("tokenizer loaded", t)
        utils.save(folder, src, model, tokenizer, config)
        phase("weights drawn, quantized and saved", t)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a random-weight, quantized MLX folder with a benchmark "
                                            "model's shapes, as mlx_lm convert -q would from its bf16 checkpoint.")
    p.add_argument("model", help="model key of ingot/bench/model_shapes.json, e.g. qwen3-30b-a3b")
    p.add_argument("-o", "--output", required=True, help="folder to write (must not exist)")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True)
    p.add_argument("--layers", type=int, default=None, metavar="N", help="only the first N layers")
    a = p.parse_args(argv)
    if Path(a.output).exists():
        print(f"mlx_random: {a.output} exists", file=sys.stderr)
        return 2
    return write_or_no_room("mlx_random", lambda: write_mlx_random(a.model, a.output, a.bits, a.layers))


if __name__ == "__main__":
    sys.exit(main())
