"""Weight bytes one decode step reads, from a model file (GGUF) or folder (HF / MLX safetensors).

Every weight matrix is read once per decode step, except an untied embedding table, of which only the rows
of the batch's tokens are gathered. A tied table is read whole, as the output matrix. Used for the peers'
bytes per token (Ingot reports its own, from the layouts it repacks to) and their share of copy bandwidth.
"""

from __future__ import annotations

import sys

from ingot.formats import open_checkpoint

_EMBEDDING = ("token_embd.", "model.embed_tokens.")
_OUTPUT = ("output.", "lm_head.")


def decode_bytes(path) -> int:
    tensors = open_checkpoint(path).tensors
    untied = any(n.startswith(_OUTPUT) for n in tensors)
    return sum(t.nbytes for n, t in tensors.items() if not (untied and n.startswith(_EMBEDDING)))


if __name__ == "__main__":
    print(decode_bytes(sys.argv[1]))
