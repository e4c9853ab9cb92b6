"""The OpenAI API's requests, responses and stream chunks, as pydantic models.

Requests are validated strictly (a string where a number belongs is an error, not a guess), unknown fields
are ignored as OpenAI does, and fields this server knows but does not implement yet are refused by
`unsupported_field()` rather than silently dropped: a client asking for them must learn it got none.

Besides sampling, requests take what the engine's Decoding carries: `n` choices, `logprobs` (chat's
`logprobs` + `top_logprobs` 0..20, the legacy completions' `logprobs` 0..5), `logit_bias` (token id ->
-100..100), and `response_format` `json_object` or `json_schema`, enforced while decoding. The
engine checks what depends on the model (n against its batch, token ids against the vocabulary, a schema
against llguidance); the one-at-a-time engine refuses them all by name.

Tools follow OpenAI's chat API: `tools` (functions with a JSON-schema `parameters`), `tool_choice`,
`parallel_tool_calls`, assistant messages carrying `tool_calls` and `tool` messages answering them by
`tool_call_id`, all checked here (a tool_choice naming no offered tool, a tool message answering no call,
arguments that are not a JSON object: 400). ingot/server/tool_prompt.py puts them in the prompt and
ingot/server/tool_calls.py reads the calls back out of the reply. The deprecated `functions` /
`function_call` are refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from ingot.engine.constraint import json_grammar

DEFAULT_MAX_TOKENS_CAP = 4096  # without max_tokens, a reply may use the rest of the context, at most this


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # OpenAI's range
TokenCount = Annotated[int, Field(ge=1)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]  # OpenAI's range


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # enforced either way: the grammar admits only text the schema accepts


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("the json_schema type needs a json_schema: {name, schema}")
        return self

    def grammar(self) -> str | None:
        """llguidance's grammar for the format; None for plain text."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.type == "json_schema" else None
        return json_grammar({"type": "object"} if schema is None else schema)


class _GenerationRequest(_Request):
    """What chat and text completions share: the model, the token budget, sampling and streaming."""

    model: str
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None  # OpenAI's newer name for max_tokens; wins when both
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    # not OpenAI's, but llama.cpp's and vLLM's servers take it; bounded because the GPU sampler sizes a
    # workspace by it
    top_k: Annotated[int, Field(ge=0, le=1000)] | None = None
    min_p: Probability | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] | None = None  # at most the engine's batch, which it checks
    logit_bias: dict[str, Bias] | None = None  # token id (as a string, JSON's keys are) -> bias
    response_format: ResponseFormat | None = None  # OpenAI's is chat's; vLLM's completions take it too

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        if bias and (bad := [k for k in bias if not k.isascii() or not k.isdigit()]):
            raise ValueError(f"the keys are token ids, and {bad[0]!r} is not one")
        return bias

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict:
        """Keyword arguments for Model.stream. OpenAI's default temperature is 1, not greedy."""
        return dict(temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p,
                    top_k=self.top_k or None, min_p=self.min_p, stop=self.stop,
                    # any integer is a valid OpenAI seed; the samplers want a small non-negative one
                    seed=None if self.seed is None else self.seed % 2**31,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def decoding(self) -> dict:
        """Keyword arguments for the engine's Decoding."""
        return dict(n=self.n or 1, logprobs=self.logprob_alternatives(),
                    logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()} or None,
                    grammar=self.response_format and self.response_format.grammar())

    def logprob_alternatives(self) -> int | None:
        """How many alternatives to report with each token's logprob; None: no logprobs."""
        raise NotImplementedError

    def unsupported_field(self) -> str | None:
        """The first field asking for something this server cannot do yet, or None."""
        return None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ContentPart(_Request):
    """Any other part (image_url, input_audio, ...): accepted by the schema so it can be refused by name."""

    type: str


class FunctionCall(_Request):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError("a tool call's arguments must be a JSON object, as text")
        return arguments


class ToolCall(_Request):
    """A call the assistant made: in a request's history, and in a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Annotated[str | None, Field(validate_default=True)] = None

    @field_validator("tool_calls")
    @classmethod
    def _only_assistants_call(cls, calls, info: ValidationInfo):
        if calls and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, call_id, info: ValidationInfo):
        if info.data.get("role") == "tool" and not call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return call_id

    def text(self) -> str:
        """The content as one string: chat templates differ in whether they understand lists of parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def for_template(self) -> dict:
        """The message as chat templates take it (transformers' convention): content always a string, a
        call's arguments as a mapping, tool_calls and tool_call_id only where they belong (Llama 3's template
        tests `'tool_calls' in message`)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for names


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


# Told apart by JSON type, so a malformed object is reported as one (the tags are names errors.py drops).
ToolChoice = Annotated[Annotated[Literal["none", "auto", "required"], Tag("str")]
                       | Annotated[NamedToolChoice, Tag("dict")],
                       Discriminator(lambda v: "str" if isinstance(v, str) else "dict")]


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: Any = None

    @field_validator("messages")
    @classmethod
    def _tool_messages_answer_earlier_calls(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        called = set()
        for i, m in enumerate(messages):
            called.update(c.id for c in m.tool_calls or ())
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(f"messages[{i}] answers tool call '{m.tool_call_id}', which no earlier "
                                 "assistant message made")
        return messages

    @field_validator("tools")
    @classmethod
    def _names_unique(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or ()]
        if dup := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"two tools are named '{dup}'")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice, info: ValidationInfo):
        if "tools" not in info.data:  # tools failed validation: that error is the one to report
            return choice
        names = {t.function.name for t in info.data["tools"] or ()}
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function '{choice.function.name}', which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top, info: ValidationInfo):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported_field(self) -> str | None:
        if self.functions:
            return "functions"
        if self.function_call not in (None, "none"):
            return "function_call"
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list) and any(not isinstance(p, TextPart) for p in m.content):
                return f"messages[{i}].content"
        return super().unsupported_field()

    def chat(self) -> list[dict]:
        """Messages as the chat template takes them (text content only; the server refuses other parts)."""
        return [m.for_template() for m in self.messages]

    @property
    def has_tool_history(self) -> bool:
        return any(m.tool_calls or m.role == "tool" for m in self.messages)

    def offered_tools(self) -> list[dict] | None:
        """The tools the model is shown, as OpenAI dicts; None where it must not call one.

        "none" offers none (OpenAI's "the model will not call any tool"; nothing is parsed either). A named
        function is the only one offered; "required" offers all. Both are enforced while decoding (on the
        batching engine): the app's grammar (constraint.tool_call_grammar) admits only calls of the offered
        tools, in the format the reply is read in, with arguments matching their `parameters`."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == self.tool_choice.function.name]
        return [t.model_dump(exclude_none=True) for t in tools]


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # the legacy form: how many alternatives
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    def unsupported_field(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != 1:
            return "best_of"
        return super().unsupported_field()

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# -- responses ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache, not prefilled


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # where the engine knows (the batching one)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "Usage":
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # UTF-8: a token may hold part of a character, which `token` then shows escaped


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs]


class CompletionLogprobs(BaseModel):
    """The legacy shape: lists in parallel, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # the most likely tokens and the chosen one
    text_offset: list[int]  # where each token's text starts in the choice's text


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is tool calls alone
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler) -> dict:
        d = handler(self)
        if d["tool_calls"] is None:  # OpenAI leaves the key out of replies without calls
            del d["tool_calls"]
        return d


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    """A streamed tool call: each goes out whole, in one delta (OpenAI also allows it in pieces)."""

    index: int  # the call's place among the reply's calls


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with stream_options.include_usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A text completion; streamed, each chunk is one of these too (OpenAI uses the same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ingot"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
