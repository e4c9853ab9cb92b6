"""Weight bytes one decode step reads, from a model file (GGUF) or folder (HF / MLX safetensors).

Every weight matrix is read once per decode step, except an untied embedding table, of which only the rows
of the batch's tokens are gathered. A tied table is read whole, as the output matrix. Used for the peers'
bytes per token (Ingot reports its own, from the layouts it repacks to) and their share of copy bandwidth.
"""

from __future__ import annotations

import sys

from ingot.formats import open_checkpoint

_EMBEDDING = ("token_embd.", "model.embed_tokens.")
# Gemma 4's per-layer input table (vocabulary x layers x 256): a row per token is gathered, and it is never tied
_PER_LAYER_EMBEDDING = ("per_layer_token_embd.", "model.embed_tokens_per_layer.")
_OUTPUT = ("output.", "lm_head.")
_EXPERTS = ("_exps.", ".experts.", ".switch_mlp.")  # GGUF's stacked experts, HF's one by one, MLX's stacked


def decode_bytes(path) -> int:
    ckpt = open_checkpoint(path)
    tensors, cfg = ckpt.tensors, ckpt.config
    untied = any(n.startswith(_OUTPUT) for n in tensors)
    top_k = cfg.get("num_experts_per_tok") or cfg.get("top_k_experts")  # Qwen3-MoE's name, Gemma 4's
    active = top_k / cfg["num_experts"] if cfg.get("num_experts") else 1.0
    total = 0.0
    for n, t in tensors.items():
        if (untied and n.startswith(_EMBEDDING)) or n.startswith(_PER_LAYER_EMBEDDING):
            continue
        total += t.nbytes * (active if any(e in n for e in _EXPERTS) else 1.0)
    return round(total)


if __name__ == "__main__":
    print(decode_bytes(sys.argv[1]))
