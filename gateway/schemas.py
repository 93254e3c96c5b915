"""The OpenAI chat-completions request, validated: what is accepted, and a 400 naming whatever is not.

Parameters the server does not implement yet are refused by name (never silently ignored) unless they carry the
value that means "off" (``n: 1``, ``logprobs: false``, ...). Unknown parameters are refused too. Every such parameter
in a body is named in the one 400 (with the values accepted for it), not just the first.

The body must be strict JSON: UTF-8, no ``NaN`` / ``Infinity`` (Python's json module accepts them), nesting at most
``MAX_DEPTH`` deep, and no string (key or value) holding a lone UTF-16 surrogate (``"\ud800"`` decodes to a Python
str that no tokenizer or UTF-8 encoder accepts), and no key twice in one object (json keeps the last, a proxy may read
the first). Each is a 400 naming where it was found.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import InvalidRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as OpenAI takes them: "4" is not 4


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _MediaPart(_Strict):
    # vLLM's media ids: a part may carry a client-chosen ``uuid``; a later request may send the uuid alone (the
    # media field null or absent) to reuse the cached encoding.
    uuid: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _media_or_uuid(self):
        if getattr(self, self.type) is None and self.uuid is None:
            raise ValueError(f"an {self.type} part needs its media or a uuid")  # image_url, input_audio
        return self


class ImagePart(_MediaPart):
    type: Literal["image_url"]
    image_url: ImageURL | None = None


class InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(_MediaPart):
    type: Literal["input_audio"]
    input_audio: InputAudio | None = None


class AudioURL(_Strict):
    url: str


class AudioURLPart(_MediaPart):
    """vLLM's audio part: a URL (``data:audio/...;base64,`` or, with --allowed-media-domains, http(s))."""

    type: Literal["audio_url"]
    audio_url: AudioURL | None = None


class RefusalPart(_Strict):
    """An assistant's refusal, as a content part (OpenAI's input form): read as the text it is."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, AudioURLPart, RefusalPart], Field(discriminator="type")]
_PART_TAGS = {"text", "image_url", "input_audio", "audio_url", "refusal"}  # the discriminator values of ContentPart


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)  # given to the chat template (as vLLM does)
    refusal: str | None = None  # an assistant's (the server's own messages carry it, null, for the SDK to send back)

    @model_validator(mode="after")
    def _refusals_are_what_the_assistant_said(self):
        """An assistant's refusal, the field or a part, is what it said: folded into its content as text (which is
        how a model sees its earlier turn). Content may be null only in an assistant message with a refusal."""
        parts = self.content if isinstance(self.content, list) else []
        if self.role != "assistant":
            if self.refusal is not None or any(p.type == "refusal" for p in parts):
                raise ValueError("only assistant messages carry a refusal")
            if self.content is None:
                raise ValueError("content is required")
            return self
        if self.content is None and not self.refusal:
            raise ValueError("an assistant message needs content or a refusal")
        if parts:
            self.content = [TextPart(type="text", text=p.refusal) if p.type == "refusal" else p for p in parts]
        if self.refusal:
            said = [] if self.content is None else [TextPart(type="text", text=self.content)] \
                if isinstance(self.content, str) else self.content
            self.content = [*said, TextPart(type="text", text=self.refusal)] if said else self.refusal
        self.refusal = None
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI pads stream chunks with random characters when true (its default), against length side channels; this
    # server sends none, so only false is accepted (absent or null: none, as before the option existed).
    include_obfuscation: Literal[False] | None = None


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # any 64-bit seed, signed or not
    stop: str | list[str] | None = None
    user: str | None = None
    # Identifiers OpenAI takes for abuse monitoring and prompt-cache routing: logged by neither, changing nothing
    # about the answer (as ``user``).
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidRequest("'stop' takes at most 4 non-empty strings", param="stop")
        return stops

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def budget_param(self) -> str:
        """The field the budget came from, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


# Accepted only with the value that switches them off; anything else is a 400 naming the parameter.
_OFF_VALUES = {
    "n": (1, None), "logprobs": (False, None), "top_logprobs": (0, None), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "parallel_tool_calls": (None, True, False), "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,), "verbosity": (None,),
}
# In assistant messages: what the server's own answers carry (null) for the SDK to send back, and what would need
# tool calling or audio output. Null (or empty) is dropped; anything else is a 400 naming it.
_ASSISTANT_FIELDS = {"tool_calls": "tool calls", "function_call": "function calls",
                     "audio": "an earlier audio answer", "annotations": None}


_NULL_MEANS_DEFAULT = ("stream", "temperature", "top_p", "ignore_eos")  # fields whose default is not null

MAX_DEPTH = 32  # a chat request needs 6 levels (body, messages, message, content, part, image_url)
# Values in arrays and objects, all told (a long conversation with parts: a few per message). Past it a 400, before
# the schema's validation: that costs microseconds per value, an error each when they are wrong, all holding the GIL
# (an outside tester's 15 MB "stop": [1, 1, ...] held the gateway's event loop 40 s, and `up` killed it as hung).
MAX_VALUES = 100_000
NAMED_AT_MOST = 20  # unknown parameters named in one 400
DESCRIBED = 64  # errors looked at for the most specific (a union's branches each give one for the same value)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Constant(ValueError):
    """NaN, Infinity or -Infinity in the body: Python's json module reads them; JSON has no such values."""


def _no_constants(name: str):
    raise _Constant(name)


def _json_error(exc: ValueError) -> str:
    """What is wrong with the body's JSON, in the client's terms (never the decoder's exception text as is)."""
    if isinstance(exc, _Constant):
        return f"request body is not valid JSON: {exc} is not a JSON value (send a number, or null)"
    if isinstance(exc, UnicodeDecodeError):
        where = f" (byte {exc.start} cannot be decoded)" if exc.encoding.replace("-", "") == "utf8" else ""
        return f"request body is not valid JSON: it is not UTF-8 text{where}"
    if isinstance(exc, json.JSONDecodeError) and not exc.doc.strip():
        return "request body is empty: expected a JSON object"
    if isinstance(exc, json.JSONDecodeError):
        what = exc.msg[:1].lower() + exc.msg[1:]  # the decoder's description: "Expecting ',' delimiter"
        what = what.removesuffix(" at")  # "Invalid control character at" (the position follows)
        return f"request body is not valid JSON: {what} at line {exc.lineno}, column {exc.colno}"
    return "request body is not valid JSON"


def _accepted(off: tuple) -> str:
    """The values of an unsupported parameter that are accepted (they mean "off"), as the client writes them."""
    written = (json.dumps(int(o) if isinstance(o, float) and o.is_integer() else o) for o in off if o is not None)
    return " or ".join(dict.fromkeys(written))  # 0 and 0.0 once


def _refuse_parameters(unsupported: list[str], unknown: list[str], order: list[str]) -> None:
    """One 400 naming every unsupported parameter (set to anything but its "off" value) and every unknown one, in
    the body's order; ``param`` is the first of them."""
    if not unsupported and not unknown:
        return

    at = {name: i for i, name in enumerate(order)}

    def first(p: str) -> int:
        return at.get(p.split(".", 1)[0], len(order))

    unsupported, unknown = sorted(unsupported, key=first), sorted(unknown, key=first)
    if len(unsupported) + len(unknown) == 1:
        if unknown:
            raise InvalidRequest(f"unknown parameter '{unknown[0]}'", param=unknown[0])
        name, only = unsupported[0], _accepted(_OFF_VALUES[unsupported[0]])
        raise InvalidRequest(f"parameter '{name}' is not supported by this server"
                             + (f" (it accepts only {only})" if only else ""), param=name, code="unsupported_parameter")
    parts = []
    if unsupported:
        hints = {n: _accepted(_OFF_VALUES[n]) for n in unsupported}
        parts.append("parameters not supported by this server: "
                     + ", ".join(f"'{n}' (only {only})" if only else f"'{n}'" for n, only in hints.items()))
    if unknown:  # named up to NAMED_AT_MOST (a body of 90,000 unknown keys was answered with all their names)
        more = f" and {len(unknown) - NAMED_AT_MOST} more" if len(unknown) > NAMED_AT_MOST else ""
        parts.append(f"unknown parameter{'s' if len(unknown) > 1 else ''}: "
                     + ", ".join(f"'{n}'" for n in unknown[:NAMED_AT_MOST]) + more)
    raise InvalidRequest("; ".join(parts), param=min(unsupported + unknown, key=first),
                         code="unsupported_parameter" if unsupported else None)


class _Duplicate(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """An object's members; a key given twice is refused (json keeps the last; other parsers, and proxies reading
    the body, the first: a request two readers would take differently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def parse_json(body: bytes | str, what: str = "request body"):
    """Strict JSON (see the module's docstring), or a 400 naming what is wrong; ``what`` names the text in the
    message (a Realtime event is "the event")."""
    try:
        raw = json.loads(body, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except _Duplicate as exc:
        raise InvalidRequest(f"{what} is not valid JSON for this server: the key {exc.key!r} appears twice in one "
                             "object (which one a proxy or this server would read is not defined)",
                             param=exc.key) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequest(_json_error(exc).replace("request body", what, 1)) from None
    check_strict(raw, what)
    return raw


def check_sampling(values: dict, where: str) -> None:
    """400 unless ``values`` (any of temperature, top_p, seed) are what a chat request accepts for them; the param
    named is ``where`` + the field."""
    try:
        ChatCompletionRequest.model_validate({"model": "-", "messages": [{"role": "user", "content": "-"}], **values})
    except ValidationError as exc:
        message, param = _describe(exc.errors(include_url=False))
        raise InvalidRequest(message.replace(f"'{param}'", f"'{where}.{param}'"), param=f"{where}.{param}") from None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    raw = parse_json(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("request body must be a JSON object")
    order = list(raw)
    for name in _NULL_MEANS_DEFAULT:  # OpenAI's API reads null as "the default" for these
        if name in raw and raw[name] is None:
            del raw[name]
    if isinstance(raw.get("stream_options"), dict) and raw["stream_options"].get("include_usage", 0) is None:
        del raw["stream_options"]["include_usage"]
    _message_fields(raw.get("messages"))
    unsupported = []
    for name, off in _OFF_VALUES.items():
        if name in raw:
            value = raw.pop(name)
            if not any(value == o and type(value) is type(o) for o in off):  # true is not n=1
                unsupported.append(name)
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        # Every parameter the server does not take is named at once; other mistakes come after those are gone.
        errors = exc.errors(include_url=False)  # a dict per error: built once (a wrong list makes one per value)
        _refuse_parameters(unsupported, _unknown(errors), order)
        raise InvalidRequest(*_describe(errors)) from None
    _refuse_parameters(unsupported, [], order)
    if req.stream_options is not None and not req.stream:  # as OpenAI's API and vLLM answer it: not ignored
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return req


def _message_fields(messages) -> None:
    """Tool and function messages, and assistant messages carrying tool calls or audio, are a 400 saying so (this
    server has no tool calling or audio output); the null fields of an assistant message the server itself sent
    (``tool_calls``, ``function_call``, ``audio``, ``annotations``) are dropped, so that the SDK's multi-turn pattern
    (``messages.append(completion.choices[0].message)``) works."""
    for i, msg in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(msg, dict):
            continue
        if msg.get("role") in ("tool", "function"):
            raise InvalidRequest(f"role '{msg['role']}' is not supported by this server (it has no tool calling)",
                                 param=f"messages.{i}.role", code="unsupported_parameter")
        parts = msg.get("content")
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            if isinstance(part, dict) and part.get("type") == "file":  # OpenAI's; a feature this server lacks
                raise InvalidRequest("content parts of type 'file' (documents) are not supported by this server; "
                                     "send text, images or audio", param=f"messages.{i}.content.{j}",
                                     code="unsupported_parameter")
        if msg.get("role") != "assistant":
            continue
        for key, what in _ASSISTANT_FIELDS.items():
            if key not in msg:
                continue
            if what is not None and msg[key] not in (None, []):
                raise InvalidRequest(f"messages.{i}.{key}: {what} are not supported by this server" if key != "audio"
                                     else f"messages.{i}.audio: {what} is not supported by this server",
                                     param=f"messages.{i}.{key}", code="unsupported_parameter")
            del msg[key]


def check_strict(raw, what: str = "request body") -> None:
    """400 for nesting deeper than MAX_DEPTH, more than MAX_VALUES values in arrays and objects, or a lone surrogate
    in any key or string (iterative: no recursion; Python code, so the event loop gets its turns meanwhile)."""
    stack = [(raw, (), 1)]
    values = 0
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"{what} is nested more than {MAX_DEPTH} levels deep",
                                 param=".".join(map(str, path[:3])) or None)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        values += len(value) if isinstance(value, dict | list) else 0
        if values > MAX_VALUES:
            raise InvalidRequest(f"{what} holds more than {MAX_VALUES} values in its arrays and objects",
                                 param=str(path[0]) if path else None)  # the field that holds them
        for key, item in items:
            where = (*path, key)
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                raise InvalidRequest("a key holds a lone UTF-16 surrogate (invalid Unicode)",
                                     param=".".join(map(str, path)) or None)
            if isinstance(item, str):
                # isascii() is constant time (CPython keeps the flag): the search, one GIL-holding call, took 0.17 s
                # over a 30 MB base64 string, holding the event loop though it runs on a thread.
                if not item.isascii() and _SURROGATE.search(item):
                    raise InvalidRequest(f"'{'.'.join(map(str, where))}' holds a lone UTF-16 surrogate (invalid "
                                         "Unicode)", param=".".join(map(str, where)))
            elif isinstance(item, (dict, list)):
                stack.append((item, where, depth + 1))


def _path(loc) -> list:
    """A pydantic error location as the client's path (messages.0.content.1), without pydantic's union-branch labels
    ("str", "list[...]", "tagged-union[...]")."""
    out, prev = [], None
    for p in loc:
        label = isinstance(p, str) and (p == "str" or "[" in p)
        # A content part's discriminator tag follows its index: content.1.image_url.image_url -> content.1.image_url
        tag = p in _PART_TAGS and isinstance(prev, int) and out[-2:-1] == ["content"]
        if not (label or tag):
            out.append(p)
        prev = p
    return out


def _unknown(errors: list[dict]) -> list[str]:
    """Every unknown parameter in the body, as the client's paths, once each."""
    found = [".".join(str(p) for p in _path(e["loc"])) for e in errors if e["type"] == "extra_forbidden"]
    return list(dict.fromkeys(found))


_INSTANCE_OF = re.compile(r" or instance of \w+")


def _describe(errors: list[dict]) -> tuple[str, str]:
    """The most specific of the first DESCRIBED errors, its location written as the client's path
    (messages.0.content.1), in words that name no internal class."""
    err = max(errors[:DESCRIBED], key=lambda e: len(_path(e["loc"])))
    param = ".".join(str(p) for p in _path(err["loc"]))
    if err["type"] == "missing":
        return f"missing required parameter '{param}'", param
    msg = _INSTANCE_OF.sub("", err["msg"]).removeprefix("Value error, ")
    return f"invalid value for '{param}': {msg}", param
