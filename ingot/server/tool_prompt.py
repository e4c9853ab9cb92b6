"""How a request's tools reach the prompt, and which format the reply's calls are read in.

A chat template that reads `tools` (Qwen3's, Llama 3.1 / 3.2's) renders them itself, in the format its
model was trained on, and its tool-call and tool messages too; the reply is then read in that model's
format: a template that spells out `<tool_call>`, or a Qwen architecture, is Hermes style, another Llama
one is Llama 3 JSON.

Any other template (SmolLM2's, Gemma's, the built-in ones, a tool template whose call format no reader
here knows) gets the tools injected instead of refused: a model never trained on tools may still follow
a clear instruction, and a client offering tools to any model is common enough that a 400 would break it
for no gain. The injection is the Hermes / Qwen system prompt (the tool schemas as JSON in <tools>, the
`<tool_call>` format to answer in), put at the end of the first system message or as a new one; earlier
calls become `<tool_call>` text in their assistant message and tool results `<tool_response>` blocks in a
user message, so every template renders the conversation with the roles it knows. The reply is read as
Hermes style.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ingot.chat_template import takes_tools

_HERMES_ARCHS = {"qwen2", "qwen3", "qwen3moe"}
_LLAMA3_ARCHS = {"llama"}


@dataclass(frozen=True)
class ToolFormat:
    reader: str  # the tool_calls reader of the model's replies: "hermes" or "llama3"
    native: bool  # the template renders tools itself; else they are injected into the messages


def tool_format(arch: str, template: str) -> ToolFormat:
    """The tool format of a model of architecture arch with this chat template."""
    if takes_tools(template):
        if "<tool_call>" in template or arch in _HERMES_ARCHS:
            return ToolFormat("hermes", native=True)
        if arch in _LLAMA3_ARCHS:
            return ToolFormat("llama3", native=True)
    return ToolFormat("hermes", native=False)


def prompt_inputs(fmt: ToolFormat, messages: list[dict], tools: list[dict] | None) -> dict:
    """Model.prompt_ids' keyword arguments for these messages (chat-template form) and offered tools."""
    if fmt.native:
        return {"messages": messages} if tools is None else {"messages": messages, "tools": tools}
    return {"messages": inject(messages, tools)}


_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tool_instructions(tools: list[dict]) -> str:
    return _INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def inject(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages with the tools and the tool turns written as plain text, for a template without tools."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":  # one user turn answers all of one turn's calls
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            calls = [_call_text(c["function"]) for c in m["tool_calls"]]
            out.append({"role": m["role"], "content": "\n".join([m["content"], *calls] if m["content"] else calls)})
        else:
            out.append(dict(m))
    if tools:
        if out[0]["role"] in ("system", "developer"):
            out[0]["content"] = f"{out[0]['content']}\n\n{tool_instructions(tools)}"
        else:
            out.insert(0, {"role": "system", "content": tool_instructions(tools)})
    return out


def _call_text(function: dict) -> str:
    call = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"
