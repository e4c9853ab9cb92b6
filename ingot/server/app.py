"""The ASGI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics.

Handlers parse and check a request, hand it to the engine's worker and turn its events into one JSON
response or a stream of server-sent events. A chat reply passes through a tool_calls reader, which turns
the calls it finds into `tool_calls` (whole calls in one delta each, when streamed). Every failure leaves
as an OpenAI-shaped error with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ingot.errors import ContextLengthError, IngotError
from ingot.engine.constraint import tool_call_grammar
from ingot.engine.logits import TokenLogprob
from ingot.server import tool_calls
from ingot.server.engine import (BadOption, Cancelled, Decoding, Done, Engine, EngineDown, Failed, Job, QueueFull,
                                 ShuttingDown, Started, Text, TimedOut, make_engine)
from ingot.server.errors import APIError, invalid_request, unsupported
from ingot.server.logprobs import LogprobFormat
from ingot.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                   ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChoice,
                                   CompletionRequest, Delta, FunctionCall, ModelCard, ModelList, NamedToolChoice,
                                   ToolCall, ToolCallDelta, Usage, new_call_id, new_id, now)
from ingot.server.tool_prompt import ToolFormat, prompt_inputs, tool_format

OPEN_PATHS = {"/health"}  # answered without the API key, so a supervisor can probe the server


def create_app(model, model_id: str, api_key: str | None = None, max_queue: int = 64,
               request_timeout: float = 600.0, **batching) -> Starlette:
    """The app serving `model` under the name `model_id`. It owns a worker thread, ended at shutdown.
    batching: max_batch, kv_blocks or kv_cache_gb, prefix_cache, step_tokens, for backends that run batched
    steps."""
    api = _API(make_engine(model, max_queue, request_timeout, **batching), model_id)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(api.engine.close)

    app = Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.engine = api.engine
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    return app


class _API:
    def __init__(self, engine: Engine, model_id: str):
        self.engine, self.model_id = engine, model_id
        self.created = now()

    async def health(self, request: Request) -> Response:
        if self.engine.down:  # a supervisor's probe sees a server that cannot serve
            return JSONResponse({"status": "error", "error": self.engine.down}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, "busy": self.engine.busy,
                             "running": self.engine.running, "queued": self.engine.queued})

    async def metrics(self, request: Request) -> Response:
        m = self.engine.metrics
        return Response(m.render(), media_type=m.content_type)

    async def models(self, request: Request) -> Response:
        return JSONResponse(ModelList(data=[self._card()]).model_dump())

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model_id"])
        return JSONResponse(self._card().model_dump())

    async def chat_completions(self, request: Request) -> Response:
        async with self._counted("chat/completions"):
            req = await self._parse(request, ChatCompletionRequest)
            inputs, new_reader, grammar = self._chat_inputs(req)
            return await self._generate(request, req, inputs, chat=True, new_reader=new_reader, tool_grammar=grammar)

    async def completions(self, request: Request) -> Response:
        async with self._counted("completions"):
            req = await self._parse(request, CompletionRequest)
            return await self._generate(request, req, {"prompt": req.text()}, chat=False)

    def _chat_inputs(self, req: ChatCompletionRequest):
        """The prompt inputs of a chat request, what makes a reader of a reply to it (of tool calls, or
        plain: one reader per reply, as a reader keeps the state of the reply it reads), and the grammar that
        enforces a call where tool_choice requires one (else None)."""
        if not (req.tools or req.has_tool_history):
            return {"messages": req.chat()}, tool_calls.PlainReply, None
        offered = req.offered_tools()
        inputs = prompt_inputs(self._tool_format, req.chat(), offered)
        if offered is None:  # tool_choice "none": the reply is text, whatever it looks like
            return inputs, tool_calls.PlainReply, None
        names = {t["function"]["name"] for t in offered}
        several = req.parallel_tool_calls is not False
        grammar = None
        if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
            grammar = tool_call_grammar(self._tool_format.reader, offered, several)
        return inputs, functools.partial(tool_calls.reader, self._tool_format.reader, names, several), grammar

    @functools.cached_property
    def _tool_format(self) -> ToolFormat:
        model = self.engine.model
        try:
            return tool_format(model.arch, model.chat_template)
        except IngotError as e:  # no tokenizer, or a template that does not parse
            raise _error_of(e) from None

    @contextlib.asynccontextmanager
    async def _counted(self, endpoint: str):
        """Count the request under the status it is answered with (a stream's, 200, once it starts)."""
        status = 500
        try:
            yield
            status = 200
        except APIError as e:
            status = e.status
            raise
        finally:
            self.engine.metrics.requests.labels(endpoint, str(status)).inc()

    # -- the steps every generation request takes ------------------------------------------------------
    async def _parse(self, request: Request, schema):
        try:
            data = json.loads(await request.body(), parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise invalid_request(e) from None
        if field := req.unsupported_field():
            raise unsupported(field)
        self._check_model(req.model)
        return req

    def _prepare(self, inputs: dict, max_tokens: int | None, decoding: Decoding) -> tuple[list[int], int]:
        self.engine.check(decoding)
        return self.engine.prepare(inputs, max_tokens)

    async def _generate(self, request: Request, req, inputs: dict, chat: bool,
                        new_reader=tool_calls.PlainReply, tool_grammar: str | None = None) -> Response:
        """new_reader: makes the tool_calls reader of one chat reply (one per choice); tool_grammar: the
        grammar of the call tool_choice requires."""
        options = req.decoding()
        if tool_grammar is not None:
            if options["grammar"] is not None:
                raise APIError(400, "a response_format cannot be combined with a tool_choice that requires a call",
                               param="response_format")
            options.update(grammar=tool_grammar, grammar_field="tool_choice")
        decoding = Decoding(**options)
        try:
            # off the event loop: a long prompt takes a while to template and tokenize
            ids, max_tokens = await asyncio.to_thread(self._prepare, inputs, req.token_limit, decoding)
            job = self.engine.submit(ids, max_tokens, req.sampling(), decoding)
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except (IngotError, ShuttingDown, EngineDown) as e:
            raise _error_of(e) from None
        # Until the answer starts, a client that leaves cancels its job here; once a stream runs,
        # StreamingResponse notices the disconnect itself and the stream's cleanup cancels the job.
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()
            if isinstance(first, Failed):
                raise _error_of(first.error)
            assert isinstance(first, Started)
            logprobs = None if decoding.logprobs is None else LogprobFormat(self.engine.vocabulary())
            if req.stream:
                watch.cancel()
                chunks = (_chat_chunks(job, self.model_id, req.include_usage, logprobs, new_reader) if chat
                          else _completion_chunks(job, self.model_id, req.include_usage, logprobs))
                return StreamingResponse(_sse(job, chunks),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            choices = [_Choice() for _ in range(decoding.n)]
            async for event in _events(job):
                choices[event.index].add(event)
            return JSONResponse(_whole(chat, self.model_id, choices, logprobs, new_reader).model_dump())
        finally:
            watch.cancel()

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{self.model_id}'",
                           param="model", code="model_not_found")

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_id, created=self.created)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _usage(dones: list[Done]) -> Usage:
    """The prompt once (the first choice's view of the prefix cache), the choices' tokens summed."""
    first = dones[0]
    return Usage.of(first.prompt_tokens, sum(d.completion_tokens for d in dones), first.cached_tokens)


def _tool_call(call: tool_calls.Call, cls=ToolCall, **extra) -> ToolCall:
    """The reply's form of a call the reader found, under a new id."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return cls(id=new_call_id(), function=FunctionCall(name=call.name, arguments=arguments), **extra)


def _finish_reason(done: Done, called: bool) -> str:
    return "tool_calls" if called else done.finish_reason


@dataclass
class _Choice:
    """One choice of a whole (not streamed) response, as its events come."""

    pieces: list[str] = field(default_factory=list)
    scored: list[TokenLogprob] = field(default_factory=list)
    done: Done | None = None

    def add(self, event: Text | Done) -> None:
        if isinstance(event, Done):
            self.done = event
        else:
            self.pieces.append(event.text)
            self.scored += event.logprobs or []


def _whole(chat: bool, model_id: str, choices: list[_Choice], logprobs: LogprobFormat | None,
           new_reader=tool_calls.PlainReply):
    """The whole reply; each chat choice read by a new tool_calls reader."""
    usage = _usage([c.done for c in choices])
    if chat:
        out = []
        for i, c in enumerate(choices):
            content, calls = tool_calls.split(new_reader(), "".join(c.pieces))
            message = AssistantMessage(content=(content or None) if calls else content,
                                       tool_calls=[_tool_call(call) for call in calls] or None)
            out.append(ChatChoice(index=i, message=message, finish_reason=_finish_reason(c.done, bool(calls)),
                                  logprobs=logprobs and logprobs.chat(c.scored)))
        return ChatCompletion(id=new_id("chatcmpl"), created=now(), model=model_id, usage=usage, choices=out)
    return Completion(id=new_id("cmpl"), created=now(), model=model_id, usage=usage, choices=[
        CompletionChoice(index=i, text="".join(c.pieces), finish_reason=c.done.finish_reason,
                         logprobs=logprobs and logprobs.completion(c.scored)) for i, c in enumerate(choices)])


# -- streaming ------------------------------------------------------------------------------------------
async def _events(job: Job):
    """The job's Text and Done events until every choice is done; a Failed one raises."""
    left = job.decoding.n
    while left:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise _error_of(event.error)
        yield event
        left -= isinstance(event, Done)


async def _chat_chunks(job: Job, model_id: str, include_usage: bool, logprobs: LogprobFormat | None,
                       new_reader=tool_calls.PlainReply):
    def chunk(**kw) -> dict:
        d = ChatCompletionChunk(id=rid, created=created, model=model_id, **kw).model_dump()
        for choice in d["choices"]:  # OpenAI's deltas carry only what they set
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            del d["usage"]
        return d

    rid, created, dones = new_id("chatcmpl"), now(), []
    n = job.decoding.n
    readers = [new_reader() for _ in range(n)]
    calls = [0] * n
    # Logprobs of tokens whose text a reader holds back (a tool call may be starting) go out with the next
    # content the choice sends; a tool call has none (as OpenAI's).
    held: list[list[TokenLogprob]] = [[] for _ in range(n)]
    for i in range(n):
        yield chunk(choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    async for event in _events(job):
        i = event.index
        if isinstance(event, Text):
            held[i] += event.logprobs or []
        for item in readers[i].push(event.text) if isinstance(event, Text) else readers[i].finish():
            if isinstance(item, str):
                yield chunk(choices=[ChatChunkChoice(index=i, delta=Delta(content=item),
                                                     logprobs=logprobs and logprobs.chat(held[i]))])
            else:
                call = _tool_call(item, ToolCallDelta, index=calls[i])
                yield chunk(choices=[ChatChunkChoice(index=i, delta=Delta(tool_calls=[call]))])
                calls[i] += 1
            held[i] = []
        if isinstance(event, Done):
            dones.append(event)
            yield chunk(choices=[ChatChunkChoice(index=i, delta=Delta(),
                                                 finish_reason=_finish_reason(event, calls[i] > 0))])
    if include_usage:
        yield chunk(choices=[], usage=_usage(dones))


async def _completion_chunks(job: Job, model_id: str, include_usage: bool, logprobs: LogprobFormat | None):
    def chunk(**kw) -> dict:
        d = Completion(id=rid, created=created, model=model_id, **kw).model_dump()
        if not include_usage:
            del d["usage"]
        return d

    rid, created, dones = new_id("cmpl"), now(), []
    async for event in _events(job):
        if isinstance(event, Text):
            yield chunk(choices=[CompletionChoice(index=event.index, text=event.text,
                                                  logprobs=logprobs and logprobs.completion(event.logprobs))])
        else:
            dones.append(event)
            yield chunk(choices=[CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)])
    if include_usage:
        yield chunk(choices=[], usage=_usage(dones))


async def _sse(job: Job, chunks):
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`. An error after the stream
    started can no longer change the status, so it goes out as an OpenAI error object in the stream."""
    try:
        try:
            async for chunk in chunks:
                yield _data(chunk)
        except APIError as e:
            yield _data(e.body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away mid-stream (or all is sent: then it changes nothing)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- errors -----------------------------------------------------------------------------------------------
def _error_of(e: Exception) -> APIError:
    """The API error for what the worker raised."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, BadOption):
        return APIError(400, str(e), param=e.param, code="invalid_value")
    if isinstance(e, TimedOut):
        return APIError(504, str(e), type="timeout_error", code="request_timeout")
    if isinstance(e, (Cancelled, ShuttingDown)):
        return APIError(503, str(e), type="server_error", code="cancelled")
    if isinstance(e, EngineDown):
        return APIError(503, str(e), type="server_error", code="engine_down")
    if isinstance(e, IngotError):  # e.g. a chat template that refuses the conversation
        return APIError(400, str(e))
    return APIError(500, f"the server failed on this request: {type(e).__name__}: {e}", type="server_error")


async def _api_error(request: Request, e: APIError) -> Response:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    return APIError(e.status_code, str(e.detail), type="invalid_request_error", headers=e.headers).response()


async def _internal_error(request: Request, e: Exception) -> Response:
    return APIError(500, f"internal server error: {type(e).__name__}", type="server_error").response()


class _BearerAuth:
    """Every path but OPEN_PATHS needs `Authorization: Bearer <api key>` (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
