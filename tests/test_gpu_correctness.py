"""benchmarks/gpu_correctness.py's MoE check: both backends' expert choices recorded and compared, so that a
logit error is explained only by a near-tied choice made before it."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_correctness as gc  # noqa: E402

NARROW = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, vocab_size=512, num_hidden_layers=2, num_experts=8,
              num_experts_per_tok=2)


def test_routing_flips_counts_each_differing_row_with_its_gap():
    ids = lambda *rows: torch.tensor(rows)  # noqa: E731
    # two MoE layers, a prefill call of two rows per layer, then one decode call per layer
    ref = [(ids([0, 1], [2, 3]), torch.tensor([0.5, 0.01])), (ids([4, 5], [6, 7]), torch.tensor([0.2, 0.3])),
           (ids([1, 2]), torch.tensor([0.004])), (ids([3, 4]), torch.tensor([0.9]))]
    fast = [ids([0, 1], [2, 4]), ids([4, 5], [6, 7]), ids([1, 3]), ids([3, 4])]
    choices, flipped = gc.routing_flips(ref, fast, n_layers=2)
    assert choices == 6 and sorted(flipped) == pytest.approx([0.004, 0.01])


def test_the_moe_slice_check_records_both_backends_choices(tmp_path, kernel_device, monkeypatch):
    """The whole check on a narrow Qwen3-MoE file: both backends route every row of every layer (prefill and
    decode), the choices agree here, and the logits pass; then a router that picks other experts fails it."""
    from ingot.bench.synthetic import write_synthetic_gguf

    path = write_synthetic_gguf("qwen3-30b-a3b", "q8_0", tmp_path / "moe.gguf", progress=False, overrides=NARROW)
    monkeypatch.setattr(gc, "RESULTS", [])
    gc.slice_logits(path, "narrow", n_prompt=12, device=kernel_device)
    logits = gc.RESULTS[0]
    assert logits["ok"] and all(r["ok"] for r in gc.RESULTS), gc.RESULTS
    assert logits["choices"] == 2 * (12 + 8) and logits["flipped"] == 0 and logits["first_flip_stage"] is None

    route = gc.cuda_moe.route

    def shifted(*args, **kwargs):  # every row's first choice one expert on: wide gaps, not near-ties
        ids, weights = route(*args, **kwargs)
        ids[:, 0] = (ids[:, 0] + 1) % NARROW["num_experts"]
        return ids, weights

    monkeypatch.setattr(gc.cuda_moe, "route", shifted)
    monkeypatch.setattr(gc, "RESULTS", [])
    gc.slice_logits(path, "narrow", n_prompt=12, device=kernel_device)
    assert not gc.RESULTS[0]["ok"] and gc.RESULTS[0]["first_flip_stage"] == 0
