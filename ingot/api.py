"""The public Python API: ingot.load() and Model."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from ingot.engine.generator import Generator, Stats
from ingot.engine.runner import Runner
from ingot.engine.sampler import Sampler, SamplingParams
from ingot.errors import IngotError, UnsupportedError

DEFAULT_MAX_CONTEXT = 4096  # like llama.cpp's default; pass max_context for more


def _pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IngotError("device='cuda' was asked for, but torch sees no CUDA GPU")
    return device


def load(path_or_name, device=None, max_context: int | None = None, dtype=None, progress: bool | None = None,
         backend: str | None = None, quant: str | None = None, max_batch: int = 1):
    """Load a GGUF or .ingot file, a Hugging Face or MLX folder, or an embedded model name (`ingot models`).

    backend: "cuda" (Triton kernels; the default on a GPU) or "reference" (plain torch ops, the default on
    the CPU). quant: for float checkpoints on the CUDA backend, "q4" or "q8" quantizes at load.
    max_batch: sequences the CUDA backend decodes together (1..32; `Model.generate_batch`); the KV cache
    and buffers are sized for it at load."""
    from ingot.formats import open_checkpoint
    from ingot.models import build_spec
    from ingot.registry import resolve

    path = resolve(path_or_name)
    ckpt = open_checkpoint(path)
    spec = build_spec(ckpt.arch, ckpt.config)
    spec.check_tensors(ckpt.tensors, str(path))
    device = _pick_device(device)
    context = min(DEFAULT_MAX_CONTEXT, spec.max_context) if max_context is None else int(max_context)
    if context < 1:
        raise IngotError(f"max_context must be positive, got {max_context}")
    factors = ckpt.tensors.get("rope_freqs.weight")
    factors = factors.dequantize() if factors else None
    backend = backend or _default_backend(device, spec)
    if max_batch < 1:
        raise IngotError(f"max_batch must be at least 1, got {max_batch}")
    if max_batch != 1 and backend != "cuda":
        raise IngotError(f"max_batch={max_batch}: only the CUDA backend decodes several sequences at once")
    if backend == "cuda":
        from ingot.backends.cuda.backend import BATCH_BUCKETS, COVERED, CudaBackend, cache_slots

        if missing := [f for f in spec.beyond_uniform() if f not in COVERED]:
            raise UnsupportedError(
                f"{path}: the CUDA backend does not cover {spec.arch}'s {', '.join(missing)} yet; "
                "load it with backend='reference'"
            )
        from ingot.backends.cuda.prefill import prefill_buffer_bytes
        from ingot.backends.cuda.weights import kv_cache_bytes
        from ingot.backends.cuda.weights import load_weights as pack_weights

        if not 1 <= max_batch <= BATCH_BUCKETS[-1]:
            raise IngotError(f"max_batch must be between 1 and {BATCH_BUCKETS[-1]}, got {max_batch}")
        # buffers: the decode steps' static buffers and the GEMV workspaces, a generous margin
        reserve = {"KV cache": kv_cache_bytes(spec, context, cache_slots(max_batch)),
                   "prefill buffers": prefill_buffer_bytes(spec, context),
                   "buffers": (256 + 64 * max_batch) * 2**20}
        weights = pack_weights(ckpt, spec, device, quant, progress, reserve)
        engine = CudaBackend(spec, weights, device, factors, max_batch=max_batch)
    elif backend == "reference":
        from ingot.backends.reference import ReferenceBackend, load_weights

        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
        engine = ReferenceBackend(spec, load_weights(ckpt, spec, device, dtype, progress), device, dtype, factors)
    else:
        raise IngotError(f"unknown backend '{backend}' (cuda or reference)")
    return Model(path, ckpt, spec, engine, context)


def _default_backend(device: torch.device, spec) -> str:
    """The CUDA kernels where they cover the model, the reference backend everywhere else."""
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reference"
    return "cuda"


class Model:
    def __init__(self, path: Path, ckpt, spec, backend, max_context: int):
        self.path, self.spec, self.backend = path, spec, backend
        self.arch, self.config, self.format = ckpt.arch, ckpt.config, ckpt.format
        self.device = backend.device
        self.max_context = max_context
        self.tokenizer = ckpt.load_tokenizer()
        self.runner = Runner(backend, max_context)
        self.last_stats = Stats()

    @property
    def memory(self) -> dict:
        """Bytes held on the device: weights, KV cache, the decode steps' static buffers, and their total."""
        weights, kv = self.backend.weight_bytes, self.runner.cache.nbytes
        buffers = getattr(self.backend, "buffer_bytes", 0)
        return {"weights": weights, "kv_cache": kv, "buffers": buffers, "total": weights + kv + buffers}

    def __repr__(self) -> str:
        return f"<ingot.Model {self.arch} from {self.path.name} on {self.device}, context {self.max_context}>"

    # -- text in, text out -------------------------------------------------------------------------------
    def generate(self, prompt=None, messages=None, max_tokens: int = 256, temperature: float = 0.0,
                 top_k=None, top_p=None, min_p=None, repeat_penalty=None, seed=None, stop=None, *,
                 presence_penalty=None, frequency_penalty=None) -> str:
        """The new text only. Give a raw prompt, or chat messages (rendered with the model's template).
        presence_penalty / frequency_penalty (-2..2) are OpenAI's, over the last 64 tokens."""
        return "".join(self.stream(prompt, messages, max_tokens, temperature, top_k, top_p, min_p,
                                   repeat_penalty, seed, stop, presence_penalty=presence_penalty,
                                   frequency_penalty=frequency_penalty))

    def stream(self, prompt=None, messages=None, max_tokens: int = 256, temperature: float = 0.0,
               top_k=None, top_p=None, min_p=None, repeat_penalty=None, seed=None, stop=None, *,
               presence_penalty=None, frequency_penalty=None) -> Iterator[str]:
        """Like generate, yielding text pieces as they are produced."""
        yield from self.stream_ids(self.prompt_ids(prompt, messages), max_tokens, temperature, top_k, top_p, min_p,
                                   repeat_penalty, seed, stop, presence_penalty=presence_penalty,
                                   frequency_penalty=frequency_penalty)

    def stream_ids(self, ids: list[int], max_tokens: int = 256, temperature: float = 0.0, top_k=None, top_p=None,
                   min_p=None, repeat_penalty=None, seed=None, stop=None, *, presence_penalty=None,
                   frequency_penalty=None) -> Iterator[str]:
        """stream() from prompt ids already made (by prompt_ids), so a caller that counted them first does
        not tokenize twice."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed, presence_penalty,
                                frequency_penalty)
        gen = Generator(self.runner)
        try:
            yield from gen.text(ids, self._need_tokenizer(), _check_max_tokens(max_tokens), params,
                                [stop] if isinstance(stop, str) else stop)
        finally:
            self.last_stats = gen.stats

    @property
    def chat_template(self) -> str:
        """The model file's chat template, or the built-in one of its architecture."""
        from ingot.chat_template import builtin_template

        return self._need_tokenizer().chat_template or builtin_template(self.arch)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The prompt text the model's chat template makes of messages (and of tools, OpenAI's
        {"type": "function", "function": {...}} dicts, for a template that renders them)."""
        from ingot.chat_template import render_chat

        tok = self._need_tokenizer()
        if not messages:
            raise IngotError("messages is empty")
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos, tools=tools)

    # -- tokens in, tokens out -----------------------------------------------------------------------------
    def generate_ids(self, ids: list[int], max_tokens: int = 256, temperature: float = 0.0, top_k=None,
                     top_p=None, min_p=None, repeat_penalty=None, seed=None, *, presence_penalty=None,
                     frequency_penalty=None) -> list[int]:
        """Generated token ids, stopping at (and not returning) an end-of-sequence token."""
        ids = [int(i) for i in ids]
        if not ids:
            raise IngotError("ids is empty")
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise IngotError(f"token ids must be in [0, {self.spec.vocab_size})")
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed, presence_penalty,
                                frequency_penalty)
        gen = Generator(self.runner)
        try:
            return list(gen.tokens(ids, _check_max_tokens(max_tokens), params, self._stop_ids()))
        finally:
            self.last_stats = gen.stats

    def generate_batch(self, prompts: list[str], max_tokens: int = 256, temperature: float = 0.0, top_k=None,
                       top_p=None, min_p=None, seed=None) -> list[str]:
        """The new text of each prompt, decoded together in one batch (load with max_batch >= len(prompts))."""
        tok = self._need_tokenizer()
        ids = [self.prompt_ids(p) for p in prompts]
        outs = self.generate_batch_ids(ids, max_tokens, temperature, top_k, top_p, min_p, seed)
        return [tok.decode(o) for o in outs]

    def generate_batch_ids(self, prompts: list[list[int]], max_tokens: int = 256, temperature: float = 0.0,
                           top_k=None, top_p=None, min_p=None, seed=None) -> list[list[int]]:
        """Generated ids of each prompt, decoded together: one step of the model advances every sequence.
        Each sequence stops at its end-of-sequence token; the batch runs until all have stopped."""
        if not prompts or len(prompts) > self.runner.max_batch:
            raise IngotError(f"generate_batch takes 1..{self.runner.max_batch} prompts (the max_batch given to "
                             f"ingot.load), got {len(prompts)}")
        prompts = [[int(i) for i in p] for p in prompts]
        for p in prompts:
            if not p:
                raise IngotError("a prompt is empty")
            if max(p) >= self.spec.vocab_size or min(p) < 0:
                raise IngotError(f"token ids must be in [0, {self.spec.vocab_size})")
        max_tokens = _check_max_tokens(max_tokens)
        params = SamplingParams(temperature, top_k, top_p, min_p, None, seed).validate()
        # One sampler per row, each with its own stream of random numbers (seed + row when seeded).
        samplers = [Sampler(replace(params, seed=None if seed is None else seed + i)) for i in range(len(prompts))]
        stop, runner = self._stop_ids(), self.runner
        stats = Stats(prompt_tokens=sum(map(len, prompts)), finish_reason="length")
        t0 = time.perf_counter()
        logits = runner.prefill_batch(prompts)
        stats.prefill_s = time.perf_counter() - t0
        history = [list(p) for p in prompts]
        nxt = [samplers[i](logits[i], history[i]) for i in range(len(prompts))]
        outs: list[list[int]] = [[] for _ in prompts]
        running = [max_tokens > 0] * len(prompts)
        stopped = [False] * len(prompts)
        t1 = time.perf_counter()
        while True:
            for i, t in enumerate(nxt):
                if running[i]:
                    if t in stop:
                        running[i], stopped[i] = False, True
                        continue
                    outs[i].append(t)
                    history[i].append(t)
                    running[i] = len(outs[i]) < max_tokens
            if not any(running) or any(len(r) >= runner.max_context for r in runner.batch_tokens):
                break
            if params.temperature == 0.0:
                nxt = runner.decode_batch_greedy(nxt)
            else:
                rows = runner.decode_batch(nxt)
                nxt = [samplers[i](rows[i], history[i]) for i in range(len(prompts))]
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = sum(map(len, outs))
        if all(stopped):
            stats.finish_reason = "stop"
        self.last_stats = stats
        return outs

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits (len(ids), vocab) for every position, from an empty cache."""
        if len(ids) > self.max_context:
            from ingot.errors import ContextLengthError

            raise ContextLengthError(f"{len(ids)} tokens exceed the context of {self.max_context}")
        return self.runner.forward_all([int(i) for i in ids])

    # -- helpers ---------------------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise IngotError(f"{self.path} has no tokenizer: use generate_ids() with token ids")
        return self.tokenizer

    def _stop_ids(self) -> set[int]:
        if self.tokenizer is not None:
            return set(self.tokenizer.stop_ids)
        eos = self.config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def prompt_ids(self, prompt=None, messages=None, tools=None) -> list[int]:
        """The token ids generate/stream feed the model for a prompt or chat messages (with tools)."""
        tok = self._need_tokenizer()
        if (prompt is None) == (messages is None):
            raise IngotError("give exactly one of prompt or messages")
        if messages is not None:
            # The rendered template already holds BOS where the model wants it.
            return tok.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)
        if tools is not None:
            raise IngotError("tools go with chat messages, not a raw prompt")
        ids = tok.encode(prompt)
        if not ids:
            raise IngotError("the prompt is empty")
        return ids


def _check_max_tokens(n) -> int:
    if not isinstance(n, int) or n < 0:
        raise IngotError(f"max_tokens must be a non-negative integer, got {n!r}")
    return n
