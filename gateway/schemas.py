"""The OpenAI chat-completions request, validated: what is accepted, and a 400 naming whatever is not.

Parameters the server does not implement yet are refused by name (never silently ignored) unless they carry the
value that means "off" (``n: 1``, ``logprobs: false``, ...). Unknown parameters are refused too.

The body must be strict JSON: UTF-8, no ``NaN`` / ``Infinity`` (Python's json module accepts them), nesting at most
``MAX_DEPTH`` deep, and no string (key or value) holding a lone UTF-16 surrogate (``"\ud800"`` decodes to a Python
str that no tokenizer or UTF-8 encoder accepts). Each is a 400 naming where it was found.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import InvalidRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
            raise ValueError(f"a {self.type} part needs its media or a uuid")
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


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, AudioURLPart], Field(discriminator="type")]
_PART_TAGS = {"text", "image_url", "input_audio", "audio_url"}  # the discriminator values of ContentPart


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


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
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidRequest("'stop' takes at most 4 non-empty strings", param="stop")
        return stops

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# Accepted only with the value that switches them off; anything else is a 400 naming the parameter.
_OFF_VALUES = {
    "n": (1, None), "logprobs": (False, None), "top_logprobs": (0, None), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "parallel_tool_calls": (None,), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,),
}


MAX_DEPTH = 32  # a chat request needs 6 levels (body, messages, message, content, part, image_url)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    try:
        raw = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise InvalidRequest(f"request body is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_strict(raw)
    for name, off in _OFF_VALUES.items():
        if name in raw:
            value = raw.pop(name)
            if not any(value == o and type(value) is type(o) for o in off):  # true is not n=1
                raise InvalidRequest(f"parameter '{name}' is not supported by this server", param=name,
                                     code="unsupported_parameter")
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(*_describe(exc)) from exc


def check_strict(raw) -> None:
    """400 for nesting deeper than MAX_DEPTH or a lone surrogate in any key or string (iterative: no recursion)."""
    stack = [(raw, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"request body is nested more than {MAX_DEPTH} levels deep",
                                 param=".".join(map(str, path[:3])) or None)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            where = (*path, key)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise InvalidRequest("a key holds a lone UTF-16 surrogate (invalid Unicode)",
                                     param=".".join(map(str, path)) or None)
            if isinstance(item, str):
                if _SURROGATE.search(item):
                    raise InvalidRequest(f"'{'.'.join(map(str, where))}' holds a lone UTF-16 surrogate (invalid "
                                         "Unicode)", param=".".join(map(str, where)))
            elif isinstance(item, (dict, list)):
                stack.append((item, where, depth + 1))


def _describe(exc: ValidationError) -> tuple[str, str]:
    """The most specific error, its location written as the client's path (messages.0.content.1)."""

    def path(loc) -> list:  # drop pydantic's union-branch labels ("str", "list[...]", "tagged-union[...]")
        out, prev = [], None
        for p in loc:
            label = isinstance(p, str) and (p == "str" or "[" in p)
            # A content part's discriminator tag follows its index: content.1.image_url.image_url -> content.1.image_url
            tag = p in _PART_TAGS and isinstance(prev, int) and out[-2:-1] == ["content"]
            if not (label or tag):
                out.append(p)
            prev = p
        return out

    err = max(exc.errors(include_url=False), key=lambda e: len(path(e["loc"])))
    param = ".".join(str(p) for p in path(err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"unknown parameter '{param}'", param
    return f"invalid value for '{param}': {err['msg']}", param
