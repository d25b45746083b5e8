"""Chat template rendering, in the same sandboxed jinja2 environment as transformers.

Notable features:
- one compiled template per source string (an LRU cache), in an `ImmutableSandboxedEnvironment` with
  `trim_blocks`, `lstrip_blocks` and the `loopcontrols` extension, exactly as transformers renders;
- a `{% generation %}...{% endgeneration %}` block tag that records the character range of each assistant
  reply when asked (`return_assistant_tokens_mask=True`), and renders as plain text otherwise;
- the helpers hub templates call: `raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII
  and accepts `indent`, `separators` and `sort_keys`, a sandbox-safe `dict` and `namespace`;
- `continue_final_message` with transformers' semantics: the rendered prompt ends right after the final
  message's text (its last text block for multimodal content), so generation continues it;
- everything a template sees is rebuilt from plain JSON types first: images, arrays and tensors inside
  content blocks become inert `"<TypeName>"` strings (templates only test whether media keys exist).

Checked against transformers 5.23 `utils/chat_template_utils.py` (`render_jinja_template`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CharRange", "compile_chat_template", "has_generation_block", "render_chat_template"]

CharRange = tuple[int, int]
"""A `[start, end)` character range of the rendered text (one `{% generation %}` block)."""

# Appended to the final message's text so its end can be found in the rendered prompt (transformers' tag).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning may be passed under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTracker(jinja2.ext.Extension):
    """The `{% generation %}` tag: renders its body and, while tracking, records where the body landed."""

    tags: ClassVar[set[str]] = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        environment.extend(track_generation=self.track)
        self._blocks: list[str] | None = None
        self._ranges: list[CharRange] | None = None

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        if self._blocks is not None and self._ranges is not None:
            start = sum(len(block) for block in self._blocks)
            self._ranges.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list[str], ranges: list[CharRange]) -> Iterator[None]:
        if self._blocks is not None:
            raise RuntimeError("a chat template is already being rendered with generation tracking")
        self._blocks, self._ranges = blocks, ranges
        try:
            yield
        finally:
            self._blocks, self._ranges = None, None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters and non-ASCII; chat templates want the plain JSON text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (no attribute escapes)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()` refusing underscore-prefixed attributes (a way into CPython internals)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes (got {name!r}); "
                "rename it"
            )


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` once in the sandboxed environment transformers uses (cached per string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes an inert `"<TypeName>"` string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # enum / numpy subclasses carry extra methods: strip to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """Fill `reasoning_content` (and `thinking`, read by some templates) from whichever name was used."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tool_schemas(tools: list | None) -> list | None:
    if tools is None:
        return None
    for tool in tools:
        if not isinstance(tool, dict):
            raise TypeError(
                f"tools must be JSON schemas (dicts), got {type(tool).__name__}; "
                "convert functions to schemas first"
            )
    return list(tools)


def _check_documents(documents: list | None) -> None:
    for document in documents or ():
        if not isinstance(document, dict):
            raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")


def _tag_final_message(chat: list[dict], field: str, template: str) -> str:
    """Append the continue tag to the final message's text; return that text (before tagging)."""
    if not chat:
        raise ValueError(
            "continue_final_message is set but the conversation is empty; add a message to continue"
        )
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ValueError(f"continue_final_message={field!r} but the chat template never reads that field")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text block to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_final_message(rendered: str, final_text: str) -> str:
    """End the prompt right after the final message's text (trailing spaces trimmed if the template did)."""
    if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered chat: the "
            f"template drops part of it. Final message: {final_text.strip()!r}"
        )
    loc = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:loc]
    return rendered[:loc].rstrip()


def _render_one(compiled: jinja2.Template, track: bool, variables: dict) -> tuple[str, list[CharRange]]:
    if not track:
        return compiled.render(**variables), []
    blocks: list[str] = []
    ranges: list[CharRange] = []
    with compiled.environment.track_generation(blocks, ranges):
        # One block at a time: the tracker measures the text rendered so far when a generation block ends.
        for block in compiled.generate(**variables):
            blocks.append(block)  # noqa: PERF402
    return "".join(blocks), ranges


def render_chat_template(
    template: str,
    conversations: list[list[dict]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    return_assistant_tokens_mask: bool = False,
    **kwargs: Any,
) -> list[str] | tuple[list[str], list[list[CharRange]]]:
    """Render each conversation with `template`; extra `kwargs` become template variables.

    Returns the rendered strings, or `(strings, ranges)` with the character ranges of every
    `{% generation %}` block per conversation when `return_assistant_tokens_mask` is set.
    `continue_final_message` may name the field to continue (default "content").
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are exclusive: continue the final message, or "
            "open a new assistant turn, not both"
        )
    compiled = compile_chat_template(template)
    _check_documents(documents)
    shared = {
        "tools": _plain(_tool_schemas(tools)),
        "documents": _plain(documents),
        "add_generation_prompt": add_generation_prompt,
        **_plain(kwargs),
    }
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    texts, all_ranges = [], []
    for chat in conversations:
        chat = getattr(chat, "messages", chat)
        chat = _plain(list(chat))  # a fresh copy: tagging below never touches the caller's messages
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        chat = _alias_reasoning(chat)
        final_text = _tag_final_message(chat, field, template) if continue_final_message else None
        text, ranges = _render_one(compiled, return_assistant_tokens_mask, {"messages": chat, **shared})
        if final_text is not None:
            text = _cut_at_final_message(text, final_text)
        texts.append(text)
        all_ranges.append(ranges)
    return (texts, all_ranges) if return_assistant_tokens_mask else texts


def has_generation_block(template: str) -> bool:
    """Whether a template marks assistant replies with `{% generation %}` (needed for assistant masks)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
