"""The worker thread that owns the model, and how requests reach it.

The model is not thread-safe, so every forward pass happens on one worker thread. A request is tokenized
and checked against the context when it is submitted (so a too-long one is refused at once, not when its
turn comes), then queued. Each job reports back to the asyncio side through its own asyncio.Queue, fed with
loop.call_soon_threadsafe: a Started event when it begins to run, Text pieces, then always one last event,
Done or Failed, so no waiting handler is left hanging. A job's cancel flag (set when its client goes away)
and its deadline are checked between steps.

BatchEngine (backends with forward_paged) runs continuous batching over a paged KV cache: requests join
the running batch between steps and leave it, freeing their blocks, the step they finish or are cancelled.
SerialEngine (backends without paged steps, and --max-batch 1 on CUDA, whose decode graphs make the
fastest single stream) runs one request at a time through Model.stream_ids, so it takes none of the
options of Decoding that need the logits (logprobs, logit_bias, a response format) nor n > 1.

A request with n choices runs as n sequences. The first is admitted alone; the others join once its prompt
is computed, so they find the prompt's full blocks in the prefix cache instead of prefilling it again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ingot.engine.block_manager import BLOCK_SIZE, BlockManager
from ingot.engine.constraint import Constraint, GrammarError, check_grammar, ll_tokenizer
from ingot.engine.generator import TextStream
from ingot.engine.logits import LogitBias, TokenLogprob, TokenPicker, greedy_tokens
from ingot.engine.sampler import Sampler, SamplingParams
from ingot.engine.scheduler import Scheduler, Sequence
from ingot.errors import ContextLengthError, IngotError
from ingot.server.metrics import Metrics
from ingot.server.protocol import DEFAULT_MAX_TOKENS_CAP

log = logging.getLogger("ingot.server")

DEFAULT_MAX_BATCH = 16
# Tokens a batched step carries (running decodes first, then prompt chunks). 2048 lets about four 512-token
# prompts start in one step: Qwen3-8B Q4_0 on the H200 served 751 against 487 output tok/s at 8 streams and
# 1,176 against 1,111 at 32 with 2048 against 512 (2026-12-03, results/2026-12-03-h200-s7-serve-step-tokens.csv),
# since each step that carries a prompt holds up every running stream once, however many prompts it carries.
DEFAULT_STEP_TOKENS = 2048


class QueueFull(Exception):
    """The queue of waiting requests is at --max-queue."""


class TimedOut(Exception):
    """The request ran past --request-timeout (queue wait included)."""


class Cancelled(Exception):
    """The job was stopped because its client went away (or the server is stopping)."""


class ShuttingDown(Exception):
    """The server stopped before the job's turn came."""


class EngineDown(Exception):
    """The engine's worker thread died; no request can run until the server restarts."""


class BadOption(IngotError):
    """A request option this engine or model cannot take; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Decoding:
    """What a request asks of its tokens besides sampling."""

    n: int = 1  # independent choices, each its own sequence
    logprobs: int | None = None  # alternatives reported with each token's logprob; None: no logprobs
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None  # llguidance's, from the response format's JSON schema or the required tool call
    grammar_field: str = "response_format"  # the request field the grammar enforces (named in refusals)

    def first_option(self) -> str | None:
        """The name of the first option set beyond one plainly sampled choice, or None."""
        if self.n != 1:
            return "n"
        if self.logprobs is not None:
            return "logprobs"
        if self.logit_bias:
            return "logit_bias"
        if self.grammar is not None:
            return self.grammar_field
        return None


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Text:
    text: str
    index: int = 0  # which of the request's choices
    logprobs: list[TokenLogprob] | None = None  # of the tokens the text came from, where asked for


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cached_tokens: int | None = None  # prompt tokens whose keys came from the prefix cache, where known
    index: int = 0  # which of the request's choices ended


@dataclass
class Failed:
    error: Exception


@dataclass
class Job:
    """One request: its prompt's token ids, its token limit, sampling and decoding options. Each of its
    choices ends with its own Done (or Failed)."""

    ids: list[int]
    max_tokens: int
    sampling: dict
    decoding: Decoding
    loop: asyncio.AbstractEventLoop
    arrived: float  # time.monotonic() when it was submitted
    deadline: float  # time.monotonic() past which the job stops
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # the worker sent Started (once, for all choices)

    def send(self, event) -> None:
        send_all([(self, event)])

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


def send_all(events: list[tuple[Job, object]]) -> None:
    """Each (job, event) to its job's client, in order, with one call into each event loop: a
    call_soon_threadsafe wakes its loop through a pipe and contends with it for the GIL, which once per
    token was a large share of a batched step's host time."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            for job, _ in batch:
                job.cancelled.set()


def _put_all(events: list[tuple[Job, object]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


def make_engine(model, max_queue: int = 64, request_timeout: float = 600.0, **batching) -> "Engine":
    """A BatchEngine where the model's backend runs paged steps, else a SerialEngine (which takes no
    batching options). With max_batch 1 on a backend that replays captured decode graphs (CUDA) the
    SerialEngine too: one stream through Model.stream_ids is faster there than the eager paged step."""
    backend = getattr(model, "backend", None)
    single_graphed = batching.get("max_batch") == 1 and getattr(backend, "use_graph", False)
    if hasattr(backend, "forward_paged") and not single_graphed:
        return BatchEngine(model, max_queue, request_timeout, **batching)
    return SerialEngine(model, max_queue, request_timeout)


class Engine:
    """What both engines share: the bounded queue, the checks at submit, the worker thread's life."""

    def __init__(self, model, max_queue: int, request_timeout: float):
        self.model = model
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()  # makes submit's look at the queue length and its put one step
        self._closing = threading.Event()
        self.down: str | None = None  # why the worker died, once it has
        self._thread = threading.Thread(target=self._run_worker, name="ingot-engine", daemon=True)

    def _start(self) -> None:
        self.metrics.watch(self)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._inbox.qsize()

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        return self.running > 0

    def prepare(self, inputs: dict, max_tokens: int | None) -> tuple[list[int], int]:
        """The prompt's ids and the token limit, or ContextLengthError / IngotError. Tokenizing is safe
        beside the worker: the tokenizer keeps no state between calls."""
        ids = self.model.prompt_ids(**inputs)
        n, context = len(ids), self.model.max_context
        if max_tokens is None:
            if n >= context:
                raise ContextLengthError(f"the prompt has {n} tokens, which leaves no room to generate "
                                         f"in the context of {context}")
            return ids, min(context - n, DEFAULT_MAX_TOKENS_CAP)
        if n + max_tokens > context:
            raise ContextLengthError(f"the prompt has {n} tokens and max_tokens is {max_tokens}: "
                                     f"{n + max_tokens} is more than the context of {context}")
        return ids, max_tokens

    def check(self, decoding: Decoding) -> None:
        """BadOption if this engine cannot decode as asked."""
        raise NotImplementedError

    def submit(self, ids: list[int], max_tokens: int, sampling: dict, decoding: Decoding = Decoding()) -> Job:
        """Queue a prepared, checked job (call from the event loop); QueueFull if --max-queue jobs already
        wait."""
        arrived = time.monotonic()
        job = Job(ids, max_tokens, sampling, decoding, asyncio.get_running_loop(), arrived,
                  arrived + self.request_timeout)
        with self._lock:
            if self.down:
                raise EngineDown(self.down)
            if self._closing.is_set():
                raise ShuttingDown("the server is shutting down")
            if self.queued >= self.max_queue:
                raise QueueFull
            self._inbox.put(job)
        return job

    def close(self) -> None:
        """Stop the running jobs at their next step, fail the waiting ones, end the worker."""
        with self._lock:
            self._closing.set()
            self._inbox.put(None)
        self._thread.join(timeout=30)

    def _run_worker(self) -> None:
        ending: Exception = ShuttingDown("the server is shutting down")
        try:
            if self.model.device.type == "cuda" and self.model.device.index is not None:
                # A new thread's current CUDA device is device 0; Triton launches follow the current device.
                torch.cuda.set_device(self.model.device.index)
            self._work()
        except Exception as e:  # the steps catch their own failures: this is the engine itself breaking
            log.exception("the engine's worker died")
            with self._lock:
                self.down = f"the inference engine failed ({type(e).__name__}: {e}); restart the server"
            ending = EngineDown(self.down)
            self._fail_running(ending)
        while True:  # whatever arrived meanwhile
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(Failed(ending))

    def _fail_running(self, error: Exception) -> None:
        """Tell the clients of the jobs the worker held when it died."""
        raise NotImplementedError

    def _work(self) -> None:
        raise NotImplementedError


class SerialEngine(Engine):
    """One request at a time, in arrival order, through Model.stream_ids."""

    def __init__(self, model, max_queue: int = 64, request_timeout: float = 600.0):
        super().__init__(model, max_queue, request_timeout)
        self._current: Job | None = None
        self._start()

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def check(self, decoding: Decoding) -> None:
        if option := decoding.first_option():
            raise BadOption(option, f"'{option}' needs the batching engine, and this server runs one request at a "
                                    "time through the model's own decode loop (--max-batch 1 on CUDA, or a backend "
                                    "without paged steps): serve with --max-batch 2 or more for it")

    def _work(self) -> None:
        while not self._closing.is_set() and (job := self._inbox.get()) is not None:
            self._current = job
            try:
                self._run(job)
            except Exception as e:  # a request must never take the worker down
                if not isinstance(e, (IngotError, TimedOut, Cancelled)):
                    log.exception("request failed")
                job.send(Failed(e))
            finally:
                self._current = None

    def _fail_running(self, error: Exception) -> None:
        if (job := self._current) is not None:
            job.send(Failed(error))

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            raise Cancelled("the client went away while the request waited")
        if job.should_stop():
            raise TimedOut(f"the request waited longer than the timeout of {self.request_timeout:g} s")
        model = self.model
        job.send(Started(len(job.ids)))
        previous = model.last_stats
        stream = model.stream_ids(job.ids, max_tokens=job.max_tokens, **job.sampling)
        stopped, last, m = False, None, self.metrics
        try:
            for piece in stream:
                if job.should_stop() or self._closing.is_set():
                    stopped = True
                    break
                t = time.monotonic()
                if last is None:
                    m.time_to_first_token.observe(t - job.arrived)
                else:
                    m.inter_token_latency.observe(t - last)
                last = t
                job.send(Text(piece))
        finally:
            stream.close()  # stops decoding; stream's own finally records last_stats
            if model.last_stats is not previous:  # a stream that failed before it began left the last job's
                m.prompt_tokens.inc(model.last_stats.prompt_tokens)
                m.generation_tokens.inc(model.last_stats.generated_tokens)
        if stopped:
            if job.cancelled.is_set():
                raise Cancelled("the client went away")
            if self._closing.is_set():
                raise Cancelled("the server is shutting down")
            raise TimedOut(f"the request ran longer than the timeout of {self.request_timeout:g} s")
        stats = model.last_stats
        job.send(Done(stats.prompt_tokens, stats.generated_tokens, stats.finish_reason or "length"))


class _Live:
    """What the batch engine keeps for one running choice of a job besides its Sequence."""

    def __init__(self, job: Job, index: int, tokenizer, vocabulary):
        sampling = dict(job.sampling)
        stop = sampling.pop("stop", None)
        if sampling.get("seed") is not None:  # the choices of a seeded request differ, and each reproduces
            sampling["seed"] = (sampling["seed"] + index) % 2**31
        d = job.decoding
        self.job, self.index = job, index
        bias = LogitBias(d.logit_bias) if d.logit_bias else None
        constraint = Constraint(d.grammar, vocabulary) if d.grammar is not None else None
        self.picker = TokenPicker(Sampler(SamplingParams(**sampling)), bias, constraint, d.logprobs)
        self.text = TextStream(tokenizer, [stop] if isinstance(stop, str) else stop)
        self.generated = 0
        self.scored: list[TokenLogprob] = []  # logprobs of the tokens whose text is not sent yet
        self.last_text: float | None = None  # time.monotonic() of the last Text sent
        self.siblings: list[Sequence] = []  # the job's other choices, which join when this one's prompt is done


class BatchEngine(Engine):
    """Continuous batching over a paged KV cache sized once here: kv_blocks blocks of BLOCK_SIZE positions
    (default: room for max_batch full contexts), or as many as fit in kv_cache_gb."""

    def __init__(self, model, max_queue: int = 64, request_timeout: float = 600.0, *,
                 max_batch: int = DEFAULT_MAX_BATCH, kv_blocks: int | None = None, kv_cache_gb: float | None = None,
                 prefix_cache: bool = True, step_tokens: int = DEFAULT_STEP_TOKENS):
        super().__init__(model, max_queue, request_timeout)
        backend, context = model.backend, model.max_context
        if max_batch < 1:
            raise IngotError(f"--max-batch must be at least 1, got {max_batch}")
        if step_tokens < 1:
            raise IngotError(f"--step-tokens must be at least 1, got {step_tokens}")
        if kv_blocks is not None and kv_cache_gb is not None:
            raise IngotError("give --kv-blocks or --kv-cache-gb, not both")
        if kv_cache_gb is not None:
            if not kv_cache_gb > 0:
                raise IngotError(f"--kv-cache-gb must be positive, got {kv_cache_gb}")
            kv_blocks = int(kv_cache_gb * 2**30 // backend.paged_block_bytes(BLOCK_SIZE))
        elif kv_blocks is None:
            kv_blocks = max_batch * -(-context // BLOCK_SIZE)
        if kv_blocks * BLOCK_SIZE < context:
            raise IngotError(f"a KV cache of {kv_blocks} blocks holds {kv_blocks * BLOCK_SIZE} positions, fewer than "
                             f"one context of {context}: give more (--kv-blocks, --kv-cache-gb) or a smaller "
                             "--max-context")
        self.blocks = BlockManager(kv_blocks, BLOCK_SIZE, prefix_cache)
        self.cache = backend.new_paged_cache(kv_blocks, BLOCK_SIZE)
        self.scheduler = Scheduler(self.blocks, max_batch, max(step_tokens, max_batch))
        self._tokenizer = model.tokenizer
        self._stop_ids = set(model.tokenizer.stop_ids)
        self._outbox: list[tuple[Job, object]] = []  # the events of the step under way, sent at its end
        self._start()

    @property
    def queued(self) -> int:
        return self._inbox.qsize() + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def check(self, decoding: Decoding) -> None:
        if decoding.n > self.scheduler.max_batch:
            raise BadOption("n", f"n is {decoding.n}, more choices than the batch holds: this server runs at most "
                                 f"{self.scheduler.max_batch} sequences at once (--max-batch)")
        vocab = self.model.spec.vocab_size
        if bad := [t for t in decoding.logit_bias or () if not 0 <= t < vocab]:
            raise BadOption("logit_bias", f"logit_bias has token id {bad[0]}, outside the vocabulary of {vocab}")
        if decoding.grammar is not None:
            try:
                check_grammar(decoding.grammar, self.vocabulary())
            except GrammarError as e:
                field = decoding.grammar_field
                raise BadOption(field, f"{field}'s schema cannot be enforced: {e}") from None
        if decoding.logprobs is not None:
            self.vocabulary()  # built now, off the event loop, before a response needs it

    def vocabulary(self):
        """llguidance's tokenizer of the model: the bytes of each token."""
        return ll_tokenizer(self._tokenizer, self.model.spec.vocab_size)

    def _work(self) -> None:
        while not self._closing.is_set():
            self._step()
            self._deliver()
        self._fail_running(Cancelled("the server is shutting down"))

    def _step(self) -> None:
        """Admit what arrived, run one batched forward pass and take each finished row's next token."""
        sched = self.scheduler
        self._take_new(wait=not (sched.running or sched.waiting))
        self._drop_stopped()
        try:
            plan = sched.schedule()
        except Exception as e:  # a scheduler bug: fail what it holds rather than hang every client
            log.exception("scheduling failed")
            for seq in list(sched.running) + list(sched.waiting):
                self._end(seq, Failed(e))
            return
        if not plan:
            return
        try:
            logits = self.model.backend.forward_paged(
                [(seq.tokens[seq.computed:seq.computed + n], seq.computed, seq.blocks) for seq, n in plan],
                self.cache)
            greedy = self._greedy_picks(plan, logits)
        except Exception as e:  # fails the step's requests, never the worker
            log.exception("a batched step failed")
            for seq, _ in plan:
                self._end(seq, Failed(e))
            return
        for (seq, n), row, token in zip(plan, logits, greedy):
            sched.advance(seq, n)
            if seq.pending == 0:
                try:
                    self._next_token(seq, row, token)
                except Exception as e:
                    log.exception("request failed")
                    self._end(seq, Failed(e))

    def _post(self, job: Job, event) -> None:
        """Queue an event for the job's client, sent with the rest of the step's by _deliver."""
        self._outbox.append((job, event))

    def _deliver(self) -> None:
        events, self._outbox = self._outbox, []
        send_all(events)

    def _fail_running(self, error: Exception) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._end(seq, Failed(error))
        self._deliver()

    def _take_new(self, wait: bool) -> None:
        """Move submitted jobs into the scheduler; with wait, sleep until one comes (or close)."""
        while True:
            try:
                job = self._inbox.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if job is None:
                return
            try:
                vocabulary = None if job.decoding.grammar is None else self.vocabulary()
                lives = [_Live(job, i, self._tokenizer, vocabulary) for i in range(job.decoding.n)]
            except Exception as e:  # what the checks let through but the sampler or the grammar refuses
                self._post(job, Failed(e))
                continue
            seqs = [Sequence(list(job.ids), len(job.ids), owner=live) for live in lives]
            lives[0].siblings = seqs[1:]
            self.scheduler.add(seqs[0])

    def _drop_stopped(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            job = seq.owner.job
            if job.cancelled.is_set():
                self._end(seq, Failed(Cancelled("the client went away")))
            elif job.should_stop():
                self._end(seq, Failed(TimedOut(f"the request ran longer than the timeout of "
                                               f"{self.request_timeout:g} s")))

    @staticmethod
    def _greedy_picks(plan: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[int | None]:
        """Each row's token where its sequence samples now and plainly greedily, else None. One argmax of all
        the rows and one copy to the host serve the whole step: a row's own argmax is a sync of its own."""
        plain = [seq.pending == n and seq.owner.picker.plain_greedy for seq, n in plan]
        if not any(plain):
            return [None] * len(plan)
        return [token if p else None for token, p in zip(greedy_tokens(logits), plain)]

    def _next_token(self, seq: Sequence, logits: torch.Tensor, greedy: int | None) -> None:
        """Pick seq's next token from its logits row (`greedy`: the token already picked, for a plainly
        greedy row) and pass it on: appended and its text sent, or the end of the choice."""
        live, job = seq.owner, seq.owner.job
        if not job.started:
            job.started = True
            self._post(job, Started(seq.n_prompt))
        if live.siblings:  # the prompt is computed: the other choices come next, ahead of other requests
            for sibling in reversed(live.siblings):
                self.scheduler.add(sibling, first=True)
            live.siblings = []
        token, scored = (greedy, None) if greedy is not None else live.picker(logits, seq.tokens)
        if token in self._stop_ids:
            self._send_text(live, live.text.flush(), last=True)
            self._end(seq, self._done(seq, "stop"))
            return
        seq.tokens.append(token)
        live.generated += 1
        if scored is not None:
            scored.offset = live.text.length
            live.scored.append(scored)
        self._send_text(live, live.text.push(token))
        constraint = live.picker.constraint
        if live.text.stopped:  # the logprobs of the stop string's tokens go with its text, unsent
            self._end(seq, self._done(seq, "stop"))
        elif constraint is not None and constraint.stopped:  # the grammar's text is complete: nothing may follow
            self._send_text(live, live.text.flush(), last=True)
            self._end(seq, self._done(seq, "stop"))
        elif live.generated >= job.max_tokens or len(seq.tokens) >= self.model.max_context:
            self._send_text(live, live.text.flush(), last=True)
            self._end(seq, self._done(seq, "stop" if live.text.stopped else "length"))

    def _send_text(self, live: _Live, piece: str, last: bool = False) -> None:
        """Send a piece of text with the logprobs of the tokens it came from; the last one of a choice
        also carries those of tokens that made no text."""
        if not piece and not (last and live.scored):
            return
        if piece:  # the latencies are those of text
            t, m = time.monotonic(), self.metrics
            if live.last_text is None:
                m.time_to_first_token.observe(t - live.job.arrived)
            else:
                m.inter_token_latency.observe(t - live.last_text)
            live.last_text = t
        scored = None
        if live.picker.logprobs is not None:
            scored, live.scored = live.scored, []
        self._post(live.job, Text(piece, live.index, scored))

    def _done(self, seq: Sequence, reason: str) -> Done:
        return Done(seq.n_prompt, seq.owner.generated, reason, max(seq.cached_tokens, 0), seq.owner.index)

    def _end(self, seq: Sequence, event) -> None:
        """Take seq out of the batch, free its blocks, count its tokens and tell its client."""
        self.scheduler.remove(seq)
        if seq.cached_tokens >= 0:  # it ran: its prompt was read
            self.metrics.prompt_tokens.inc(seq.n_prompt)
        self.metrics.generation_tokens.inc(seq.owner.generated)
        if isinstance(event, Failed):  # the request has failed: its other choices stop too
            seq.owner.job.cancelled.set()
        self._post(seq.owner.job, event)
