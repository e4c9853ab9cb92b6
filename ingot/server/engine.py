"""One worker thread that owns the model and runs requests one after another from a bounded queue.

The model is not thread-safe (one KV cache, one runner), so every call into it (tokenizing and templating
included) happens on the worker. Each job reports back to the asyncio side through its own asyncio.Queue,
fed with loop.call_soon_threadsafe: a Started event (prompt tokens counted, the context checked), Text
pieces, then always one last event, Done or Failed, so no waiting handler is left hanging. A job's cancel
flag (set when its client goes away) and its deadline are checked between tokens; closing the model's
stream() generator stops decoding there.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ingot.errors import ContextLengthError, IngotError
from ingot.server.metrics import Metrics
from ingot.server.protocol import DEFAULT_MAX_TOKENS_CAP

log = logging.getLogger("ingot.server")


class QueueFull(Exception):
    """The queue of waiting requests is at --max-queue."""


class TimedOut(Exception):
    """The request ran past --request-timeout (queue wait included)."""


class Cancelled(Exception):
    """The job was stopped because its client went away (or the server is stopping)."""


class ShuttingDown(Exception):
    """The server stopped before the job's turn came."""


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Text:
    text: str


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Failed:
    error: Exception


@dataclass
class Job:
    """One request: what to feed the model (prompt= or messages=), its token limit and sampling."""

    inputs: dict
    max_tokens: int | None
    sampling: dict
    loop: asyncio.AbstractEventLoop
    arrived: float  # time.monotonic() when it was submitted
    deadline: float  # time.monotonic() past which the job stops
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
            self.cancelled.set()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class Engine:
    def __init__(self, model, max_queue: int = 64, request_timeout: float = 600.0):
        self.model = model
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        self.metrics.watch(self)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._work, name="ingot-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, inputs: dict, max_tokens: int | None, sampling: dict) -> Job:
        """Queue a job (call from the event loop); QueueFull if --max-queue jobs already wait."""
        arrived = time.monotonic()
        job = Job(inputs, max_tokens, sampling, asyncio.get_running_loop(), arrived,
                  arrived + self.request_timeout)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def close(self) -> None:
        """Stop the running job at its next token, drop the waiting ones, end the worker."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.send(Failed(ShuttingDown("the server is shutting down")))
        if self._current is not None:
            self._current.cancelled.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        if self.model.device.type == "cuda":
            # A new thread's current CUDA device is device 0; Triton launches follow the current device.
            torch.cuda.set_device(self.model.device)
        while (job := self._jobs.get()) is not None:
            self._current = job
            try:
                self._run(job)
            except Exception as e:  # a request must never take the worker down
                if not isinstance(e, (IngotError, TimedOut, Cancelled)):
                    log.exception("request failed")
                job.send(Failed(e))
            finally:
                self._current = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            raise Cancelled("the client went away while the request waited")
        if job.should_stop():
            raise TimedOut(f"the request waited longer than the timeout of {self.request_timeout:g} s")
        model = self.model
        context = model.max_context
        # stream() tokenizes again; counting here first lets a too-long request be refused before any text
        n_prompt = len(model.prompt_ids(**job.inputs))
        if job.max_tokens is None:
            if n_prompt >= context:
                raise ContextLengthError(f"the prompt has {n_prompt} tokens, which leaves no room to generate "
                                         f"in the context of {context}")
            max_tokens = min(context - n_prompt, DEFAULT_MAX_TOKENS_CAP)
        else:
            max_tokens = job.max_tokens
            if n_prompt + max_tokens > context:
                raise ContextLengthError(f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: "
                                         f"{n_prompt + max_tokens} is more than the context of {context}")
        job.send(Started(n_prompt))
        previous = model.last_stats
        stream = model.stream(**job.inputs, max_tokens=max_tokens, **job.sampling)
        stopped, last, m = False, None, self.metrics
        try:
            for piece in stream:
                if job.should_stop():
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
            raise TimedOut(f"the request ran longer than the timeout of {self.request_timeout:g} s")
        stats = model.last_stats
        job.send(Done(stats.prompt_tokens, stats.generated_tokens, stats.finish_reason or "length"))
