"""The side-by-side benchmark harness (benchmarks/harness): random HF checkpoints, output parsers, report."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "harness"
DATA = Path(__file__).resolve().parent / "data" / "harness"
sys.path.insert(0, str(HARNESS))

import hf_random  # noqa: E402
import parse  # noqa: E402
import report  # noqa: E402
import weights  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("key,vocab", [("llama-3.2-1b", None), ("qwen3-0.6b", 997), ("gemma-3-1b", 1001)])
def test_hf_random_loads_in_transformers(tmp_path, key, vocab):
    transformers = pytest.importorskip("transformers")
    over = dict(TINY, **({"vocab_size": vocab} if vocab else {}))
    folder = hf_random.write_hf_random(key, tmp_path / key, layers=2, overrides=over, shard_bytes=200_000)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_theta"] and cfg["rope_parameters"], "both rope spellings (mlx_lm reads the old one)"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "written in shards"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == cfg["vocab_size"], "exactly the model's (Llama: no <|image|>)"
    assert tok.decode(tok.encode("Hello, world!").ids, skip_special_tokens=True).strip() == "Hello, world!"
    if key == "llama-3.2-1b":
        return  # its tensors are Qwen3's less q/k-norm; transformers takes ~20 s over the real vocabulary
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(auto) == cfg["vocab_size"] and auto.decode(auto.encode("a b")).endswith("a b")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = hf_random.tensor_shapes(dict(cfg))
    got = {n: tuple(p.shape) for n, p in model.state_dict().items() if n in expected}
    assert got == {n: s for n, s in expected.items() if n in got} and len(got) >= len(expected) - 1
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, cfg["vocab_size"]) and torch.isfinite(logits).all()
    assert 0.01 < float(model.model.layers[0].mlp.up_proj.weight.detach().std()) < 0.03


# Gemma 4 at a CPU test's size: the heads, MLPs and per-layer inputs shrunk, the layer structure (which layers are
# global, share KV, take values from keys) the published model's first layers'.
TINY_GEMMA4 = dict(TINY, num_key_value_heads=1, global_head_dim=32, hidden_size_per_layer_input=8, vocab_size=1001,
                   vocab_size_per_layer_input=1001)
GEMMA4_CASES = {  # key: (layers, overrides)
    "gemma-4-e2b": (20, TINY_GEMMA4),  # layers 15-19 share KV (as in the full model), 19 a global one
    "gemma-4-26b-a4b": (6, dict(TINY_GEMMA4, num_key_value_heads=2, num_global_key_value_heads=1, num_experts=8,
                                top_k_experts=2, moe_intermediate_size=32)),
}


@pytest.mark.parametrize("key", ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b"])
def test_hf_random_gemma4_names_transformers_parameters_at_published_shapes(key):
    """Every tensor of transformers' Gemma 4 at the real shapes, no more (built on the meta device)."""
    transformers = pytest.importorskip("transformers")
    cfg = hf_random._hf_config(key, None)
    config = transformers.Gemma4TextConfig.from_dict(hf_random.hf_config(cfg))
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(config)
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied
    assert hf_random.tensor_shapes(cfg) == theirs


@pytest.mark.parametrize("key", list(GEMMA4_CASES))
def test_hf_random_gemma4_ingot_and_transformers_agree(tmp_path, key):
    """The written folder loads in Ingot and in transformers, and their logits agree (same bf16 weights)."""
    import ingot

    transformers = pytest.importorskip("transformers")
    layers, over = GEMMA4_CASES[key]
    folder = hf_random.write_hf_random(key, tmp_path / key, layers=layers, overrides=over, shard_bytes=200_000)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["global_head_dim"] == 32 and cfg["use_double_wide_mlp"] in (True, False)  # mlx_lm's spelling
    assert len(transformers.AutoTokenizer.from_pretrained(folder)) == 1001
    ids = [2, 17, 300, 999, 5, 64, 128, 7]
    ours = ingot.load(folder, device="cpu", max_context=64).logits(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    assert torch.isfinite(ours).all() and ours.shape == (len(ids), 1001)
    assert float(theirs.std()) > 0.1, "the random model's logits vary"
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_hf_random_moe_hook_and_errors():
    cfg = hf_random._hf_config("qwen3-30b-a3b", 1)
    shapes = hf_random.tensor_shapes(cfg)
    assert shapes["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert hf_random.hf_config(cfg)["num_local_experts"] == 128
    with pytest.raises(ValueError, match="no random-weight writer"):
        hf_random.tensor_shapes(dict(cfg, model_type="mamba"))
    plan = hf_random.shard_plan({"a": (10,), "b": (1000,), "c": (10,)}, shard_bytes=100)
    assert plan == [["a"], ["b"], ["c"]]


def test_hf_random_refuses_a_checkpoint_the_disk_cannot_hold(tmp_path, monkeypatch):
    """Qwen3-30B-A3B's bf16 weights (61 GB) do not fit the GPU machine's disk beside its GGUFs: a clear
    refusal before anything is written, not a full disk halfway through."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**9))
    with pytest.raises(hf_random.DiskSpaceError, match=r"qwen3-30b-a3b: the bf16 checkpoint needs 61\.\d GB"):
        hf_random.write_hf_random("qwen3-30b-a3b", tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.safetensors"))
    assert hf_random.main(["qwen3-30b-a3b", "-o", str(tmp_path / "m")]) == 3


def test_parse_llama_bench_sample():
    rows = parse.llama_bench((DATA / "llama_bench.json").read_text(), "qwen3-0.6b", "Q4_0", bytes_per_token=123)
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    pp, tg = rows
    assert pp["tok_s"] > tg["tok_s"] > 0 and pp["sd"] >= 0 and pp["n"] == 2
    assert pp["engine"] == "llama.cpp" and pp["engine_version"] == "unknown (b0)"  # a tree without git
    assert parse.llama_bench((DATA / "llama_bench.json").read_text(), "m", "Q4_0", version="v")[0]["engine_version"] == "v"
    assert 4 < pp["bits_per_weight"] < 7  # Q4_0 blocks + Q6_K tied embedding
    assert tg["bytes_per_token"] == 123 and pp["bytes_per_token"] is None
    assert "first repetition" in pp["note"]
    with pytest.raises(ValueError, match="no JSON"):
        parse.llama_bench("error: failed to load model", "m", "Q4_0")


def test_parse_mlx_benchmark_sample():
    rows = parse.mlx_benchmark((DATA / "mlx_benchmark.txt").read_text(), "qwen3-0.6b", "mlx q4 g64", "mlx 0.32.4",
                               4.5, 77)
    pp, tg = rows
    assert (pp["test"], tg["test"]) == ("pp32", "tg16")
    assert pp["tok_s"] == pytest.approx((1324.193 + 1323.133 + 1250.840) / 3)
    assert tg["sd"] == pytest.approx(torch.tensor([223.876, 295.461, 248.448], dtype=torch.float64).std().item())
    assert tg["n"] == 3 and tg["bytes_per_token"] == 77 and pp["bits_per_weight"] == 4.5
    assert parse.mlx_convert_bits("[INFO] Quantized model with 4.501 bits per weight.") == 4.501
    with pytest.raises(ValueError, match="Trial"):
        parse.mlx_benchmark("Traceback ...", "m", "q4", "v")


def test_parse_ingot_bench_sample():
    rows, copy_bw = parse.ingot_bench((DATA / "ingot_bench.csv").read_text(), "qwen3-0.6b", "Q4_0")
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    assert rows[1]["bytes_per_token"] > 0 and rows[0]["bytes_per_token"] is None
    assert all(r["tok_s"] > 0 and r["n"] == 2 for r in rows)
    assert copy_bw is None  # a CPU run has no --roofline
    with pytest.raises(ValueError, match="no CSV rows"):
        parse.ingot_bench("loading ...\nerror", "m", "Q4_0")


def test_decode_bytes_counts_an_untied_embedding_out(tmp_path):
    tied = hf_random.write_hf_random("qwen3-0.6b", tmp_path / "tied", layers=1, overrides=dict(TINY, vocab_size=500))
    untied = hf_random.write_hf_random("qwen3-0.6b", tmp_path / "untied", layers=1,
                                       overrides=dict(TINY, vocab_size=500, tie_word_embeddings=False))
    table = 500 * 64 * 2
    total = sum(f.stat().st_size for f in (tmp_path / "tied").glob("*.safetensors"))
    assert 0 < total - weights.decode_bytes(tied) < 4096  # all of it but the safetensors headers
    assert weights.decode_bytes(untied) == weights.decode_bytes(tied)  # + lm_head, - the gathered table
    assert weights.decode_bytes(untied) > table


def _rows(tmp_path):
    rows_csv = tmp_path / "rows.csv"
    report.add(rows_csv, "ingot", "qwen3-0.6b", "Q4_0", DATA / "ingot_bench.csv")
    report.add(rows_csv, "llama.cpp", "qwen3-0.6b", "Q4_0", DATA / "llama_bench.json", bytes_per_token=10**6)
    report.add(rows_csv, "mlx", "qwen3-0.6b", "mlx q4 g64", DATA / "mlx_benchmark.txt", "mlx 0.32.4", 4.5, 10**6)
    return rows_csv


def test_report_csv_and_ratio_table(tmp_path):
    rows_csv = _rows(tmp_path)
    with open(rows_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["copy_bw_bytes_s"] = rows[1]["copy_bw_bytes_s"] = "1e9"  # as a GPU run's --roofline gives
    res = report.results(rows, "NVIDIA H100 80GB HBM3", "2026-11-24")
    by = {(r["engine"], r["test"]): r for r in res}
    lb = by[("llama.cpp", "tg8")]
    assert float(lb["bw_share"]) == pytest.approx(1e6 * float(lb["tok_s"]) / 1e9, abs=1e-3)  # 3 decimals
    assert by[("llama.cpp", "pp16")]["bw_share"] == ""
    md = report.markdown(res)
    lines = [ln for ln in md.splitlines() if ln.startswith("| qwen3-0.6b")]
    assert len(lines) == 4  # pp16, tg8 (both engines' tests) and MLX's pp32 / tg16, each on its own line
    tg8 = next(ln for ln in lines if "| tg8 |" in ln)
    want = float(by[("ingot", "tg8")]["tok_s"]) / float(lb["tok_s"])
    assert f"| {want:.2f} |" in tg8
    out = report.write(rows_csv, tmp_path / "out", "NVIDIA H100 80GB HBM3", "2026-11-24")
    assert out[0].name == "2026-11-24-h100.csv"
    with open(out[0], newline="") as f:
        got = list(csv.DictReader(f))
    assert {r["engine"] for r in got} == {"ingot", "llama.cpp", "mlx"} and len(got) == 6
    assert list(got[0]) == report.RESULT_FIELDS


def test_report_charts(tmp_path):
    pytest.importorskip("matplotlib")
    res = report.results(list(csv.DictReader(open(_rows(tmp_path), newline=""))), "H100", "2026-11-24")
    paths = report.charts(res, tmp_path / "x")
    assert [p.name for p in paths] == ["x-decode.png", "x-prefill.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_report_helpers():
    assert report.quant_bits("Q4_0") == 4 and report.quant_bits("mlx q8 g64") == 8
    with pytest.raises(ValueError, match="bit width"):
        report.quant_bits("bf16")
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100" and report.gpu_slug("") == "gpu"
    with pytest.raises(ValueError, match="unknown engine"):
        report.add(Path("unused.csv"), "vllm", "m", "Q4_0", DATA / "mlx_benchmark.txt")


def test_serve_bench_against_the_server(smollm2, tmp_path):
    """The load generator against a live `ingot serve` app (CPU, tiny answers): per level, every answer
    token counted from the server's usage, the prompt scaled to about the asked length, a CSV row."""
    from ingot.server.app import create_app
    from tests.test_server import _Running

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serve_bench

    running = _Running(create_app(smollm2, "smollm2-135m"))
    try:
        out = tmp_path / "serve.csv"
        rows = serve_bench.main([running.url, "--streams", "1", "2", "--prompt-tokens", "24", "--max-tokens", "4",
                                 "--requests-per-stream", "1", "--engine", "ingot", "--model", "tiny",
                                 "--csv", str(out)])
    finally:
        running.stop()
    assert [r["streams"] for r in rows] == [1, 2] and [r["requests"] for r in rows] == [1, 2]
    assert [r["completion_tokens"] for r in rows] == [4, 8]
    assert all(18 <= r["prompt_tokens_mean"] <= 30 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] for r in rows)
    with open(out) as f:
        assert [int(r["streams"]) for r in csv.DictReader(f)] == [1, 2]


@pytest.mark.parametrize("family", ["qwen3moe", "gemma4-moe"])
def test_decode_bytes_counts_the_active_experts_only(tmp_path, family):
    """The k experts a token uses (Qwen3-MoE's num_experts_per_tok, Gemma 4's top_k_experts), and of Gemma 4's
    per-layer input table only the gathered row (left out, as an untied embedding table is)."""
    from safetensors import safe_open

    from tests.tiny_models import GEMMA4_MOE, make_hf_model, save_hf

    gemma4 = dict(GEMMA4_MOE, hidden_size_per_layer_input=8)  # the experts and a per-layer input table
    model = make_hf_model("gemma4", **gemma4) if family == "gemma4-moe" else make_hf_model(family)
    save_hf(model, tmp_path)
    cfg = model.config
    top_k = getattr(cfg, "num_experts_per_tok", None) or cfg.top_k_experts
    expert = other = per_layer = 0
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if ".experts." in name:
                    expert += t.numel() * t.element_size()
                elif "embed_tokens_per_layer" in name:
                    per_layer += t.numel()
                elif not (name.startswith("model.embed_tokens.") and not cfg.tie_word_embeddings):
                    other += t.numel() * t.element_size()
    assert expert and top_k < cfg.num_experts
    assert per_layer or family == "qwen3moe"
    want = other + expert * top_k / cfg.num_experts
    assert weights.decode_bytes(tmp_path) == round(want)


def test_ppl_check_scores_as_llama_perplexity_does(tmp_path):
    """ppl_check.py: llama-perplexity's running values read from its output, and Ingot's by the same procedure
    (chunks of --ctx, BOS first where the vocabulary adds one, the second half scored), here against
    cross-entropy over the same positions."""
    import ingot
    import ppl_check
    from ingot.bench import synthetic

    gguf = synthetic.write_synthetic_gguf("gemma-3-1b", "q8_0", tmp_path / "g.gguf", layers=2, progress=False,
                                          overrides={"vocab_size": 1024})
    fake = tmp_path / "llama-perplexity"
    fake.write_text("#!/bin/sh\necho 'perplexity: calculating perplexity over 2 chunks'\necho '[1]12.5,[2]11.25,'\n")
    fake.chmod(0o755)
    out = tmp_path / "ppl.jsonl"
    assert ppl_check.main([str(gguf), "--llama-perplexity", str(fake), "--device", "cpu", "--ctx", "16",
                           "--chunks", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["llama.cpp"] == [12.5, 11.25]
    m = ingot.load(gguf, device="cpu", max_context=16, progress=False)
    ids = m.tokenizer.encode(ppl_check.text())
    assert m.tokenizer.add_bos and ids[0] == m.tokenizer.bos_id
    losses = []
    for c in range(2):
        seq = ids[c * 16:(c + 1) * 16]
        seq[0] = m.tokenizer.bos_id
        logits = m.logits(seq).double()
        losses.append(torch.nn.functional.cross_entropy(logits[8:15], torch.tensor(seq[9:16]), reduction="none"))
        want = float(torch.cat(losses).mean().exp())
        assert row["ingot"][c] == pytest.approx(want, rel=1e-9)
    assert row["final_ratio"] == pytest.approx(row["ingot"][-1] / 11.25)


def test_router_noise_nudges_both_backends_alike(tmp_path, kernel_device):
    """ppl_check --router-noise: the same nudge lands on the router weights that the reference's and the CUDA
    backend's kernels read, so the two nudged models still agree, and differ from the model before it."""
    import ingot
    import ppl_check
    from tests.tiny_models import make_hf_model, save_hf

    save_hf(make_hf_model("qwen3moe"), tmp_path)
    fast = ingot.load(tmp_path, device=kernel_device, backend="cuda", max_context=64)
    ref = ingot.load(tmp_path, device=kernel_device, backend="reference", dtype=torch.float32, max_context=64)
    ids = torch.randint(0, ref.spec.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    before = ref.logits(ids).double().cpu()
    layers = len(ref.spec.layers)
    # 10%: a nudge that moves the logits (by ~0.2) far more than the backends differ (~1e-3), so a nudge that
    # missed the tensors the CUDA kernels read would fail the first check below
    assert ppl_check.nudge_routers(fast, 0.1) == ppl_check.nudge_routers(ref, 0.1) == layers
    for a, b in zip(ppl_check.routers(fast), ppl_check.routers(ref), strict=True):
        assert torch.equal(a.float().cpu(), b.float().cpu())  # the same draw on both backends
    a, b = fast.logits(ids).double().cpu(), ref.logits(ids).double().cpu()
    assert float((a - b).norm() / b.norm()) < 5e-3
    assert float((b - before).norm() / before.norm()) > 5e-2


def test_run_starts_only_what_fits_its_budget(tmp_path):
    """harness.sh run with BUDGET: an engine whose estimate does not fit is left for the next run, its GGUF
    kept and the report still written; the next run measures only what was left."""
    state, out = tmp_path / "state", tmp_path / "out"
    bench = state / "llama.cpp" / "build" / "bin" / "llama-bench"  # a saved llama-bench output, as the tool
    bench.parent.mkdir(parents=True)
    bench.write_text(f"#!/bin/sh\ncat '{DATA / 'llama_bench.json'}'\n")
    bench.chmod(0o755)
    (state / "llama.cpp" / "LLAMA_CPP_PYTHON_VERSION").write_text("0.0.0\n")
    env = dict(os.environ, STATE=str(state), OUT=str(out), PYTHON=sys.executable, ENGINES="ingot llama.cpp",
               QUANTS="q8_0", LAYERS="1", PP="8", TG="4", REPS="1", BUDGET="100000", EST_LLAMA="100000")
    env.pop("TRITON_INTERPRET", None)

    def run(**extra):
        return subprocess.run(["bash", str(HARNESS / "harness.sh"), "run", "qwen3-0.6b"], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=900)

    first = run()
    assert "BUDGET 100000 s: qwen3-0.6b q8_0 llama.cpp left for the next run" in first.stdout, first.stdout
    done = state / "done"
    assert sorted(p.name for p in done.iterdir()) == ["qwen3-0.6b-q8_0-ingot"]
    assert (state / "models" / "qwen3-0.6b-q8_0.gguf").exists()  # kept for llama.cpp
    with open(state / "rows.csv") as f:
        assert {r["engine"] for r in csv.DictReader(f)} == {"ingot"}
    assert list(out.glob("*.md")), "the report of what was measured"

    second = run(EST_LLAMA="0")
    assert "qwen3-0.6b q8_0 ingot already measured" in second.stdout, second.stdout
    assert sorted(p.name for p in done.iterdir()) == ["qwen3-0.6b-q8_0-ingot", "qwen3-0.6b-q8_0-llama.cpp"]
    assert not (state / "models" / "qwen3-0.6b-q8_0.gguf").exists()  # every engine measured it
    with open(state / "rows.csv") as f:
        assert {r["engine"] for r in csv.DictReader(f)} == {"ingot", "llama.cpp"}
