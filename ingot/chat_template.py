"""Chat messages -> prompt text through a model's Jinja chat template, rendered in a sandbox.

A chat template comes from inside a model file, so it is untrusted input: it runs in jinja2's
ImmutableSandboxedEnvironment, and any reach for Python internals fails the render instead of
quietly rendering as empty. Otherwise the environment matches what transformers gives templates
(trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception, strftime_now), so templates
written for transformers render the same here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ingot.errors import IngotError, UnsupportedError


class _TemplateRaised(Exception):
    """raise_exception() called by the template itself: the conversation does not fit its format."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        # The stock sandbox returns an Undefined that only fails when printed; `{% if x.__class__ %}`
        # would then render on silently. Failing at the access itself leaves no way around it.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: non-ASCII kept as is, no HTML escaping (the output is a prompt, not HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise IngotError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


@lru_cache(maxsize=16)
def takes_tools(template: str) -> bool:
    """Whether the template reads the `tools` variable, that is, renders tool definitions itself."""
    _compile(template)  # a syntax error is reported as render_chat reports it
    return "tools" in meta.find_undeclared_variables(_environment().parse(template))


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", tools=None, **extra) -> str:
    """The prompt text for messages. It may already hold the BOS text: encode it without adding specials."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except SecurityError as e:
        raise IngotError(f"unsafe chat template refused: {e}") from None
    except _TemplateRaised as e:
        raise IngotError(f"chat template rejected the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise IngotError(f"chat template failed to render: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise IngotError(f"chat template failed to render: {type(e).__name__}: {e}") from None


# ---- built-in templates, for model files that carry none -------------------------------------------

# Message content may be a string or a list of parts ({"type": "text", "text": ...}); only text is kept.
_TEXT = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is iterable -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# Gemma 3: roles user/model, no system role (a system prompt opens the first user turn, then a blank line).
# Newlines are written as Jinja string literals: whitespace control ({%- -%}) would eat literal ones.
_GEMMA = _TEXT + (
    r"{{ bos_token }}"
    r"{%- set ns = namespace(prefix='') -%}"
    r"{%- if messages and messages[0]['role'] == 'system' -%}"
    r"{%- set ns.prefix = text(messages[0]['content']) ~ '\n\n' -%}"
    r"{%- set turns = messages[1:] -%}"
    r"{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    r"{%- for m in turns -%}"
    r"{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    r"{{ raise_exception('Gemma conversations must alternate user and assistant turns, starting with user') }}"
    r"{%- endif -%}"
    r"{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '\n' }}"
    r"{{ ns.prefix if loop.first else '' }}{{ text(m['content']) | trim }}{{ '<end_of_turn>\n' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_LLAMA3 = _TEXT + (
    r"{{ bos_token }}"
    r"{%- for m in messages -%}"
    r"{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\n\n' }}{{ text(m['content']) | trim }}<|eot_id|>"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

_CHATML = _TEXT + (
    r"{%- for m in messages -%}"
    r"{{ '<|im_start|>' ~ m['role'] ~ '\n' }}{{ text(m['content']) }}{{ '<|im_end|>\n' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"gemma": _GEMMA, "llama3": _LLAMA3, "chatml": _CHATML}

_FAMILY_OF_ARCH = {
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
}


def builtin_template(arch: str) -> str:
    """The built-in template for a GGUF `general.architecture` (or a family name: gemma, llama3, chatml)."""
    family = _FAMILY_OF_ARCH.get(arch, arch)
    if family not in BUILTIN_TEMPLATES:
        raise UnsupportedError(f"no built-in chat template for architecture '{arch}'")
    return BUILTIN_TEMPLATES[family]
