"""From validated messages to a prompt: media parts pulled out in order, the chat template applied, tokens counted.

Each media part leaves one placeholder token in the rendered prompt; once its encoder says how many rows its tensor
has, :func:`expand_placeholders` repeats the placeholder that many times (as the reference processors do).

The token ids are the reference processor's (LlavaProcessor, Qwen2AudioProcessor, ...): the checkpoint's chat
template renders media parts as Hugging Face content parts (``{"type": "image", "image": ...}``, ``{"type": "audio",
"audio": ...}``: templates test either the type or the key), and the text is tokenized with the tokenizer's special
tokens (Llama's ``<s>``) unless the rendered text already starts with the BOS token, the rule of the processors'
``apply_chat_template``. A media part whose modality the model does not take is a 400 naming the part.

Cheap checks come before expensive work: media parts are counted against the per-prompt limits before any is
unwrapped, and each part's header is read (models/media.py: format, pixels, duration) before it is hashed, so a
request that could never be served is refused here, with nothing queued. Each part also learns how many placeholder
tokens it will become, so the context check can run before anything is encoded (``Prompt.expected_length``).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config import DEFAULT_MM_LIMITS
from gateway.errors import Internal, InvalidRequest
from gateway.media import MediaPart, audio_from_base64, content_digest, from_data_url, is_remote, unreadable
from gateway.schemas import ChatCompletionRequest
from models.media import (
    AUDIO_FORMATS,
    MAX_AUDIO_S,
    MediaHeaderError,
    MediaInfo,
    placeholder_count,
    probe_audio,
    probe_image,
)
from models.spec import ModelSpec

log = logging.getLogger(__name__)

_MODALITY = {"image_url": "image", "input_audio": "audio", "audio_url": "audio"}  # part type -> modality


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # one placeholder token per media part, not yet expanded
    media: list[MediaPart]  # in prompt order
    namespace: str = ""  # the tenant's cache namespace its media are keyed in (gateway/auth.py)
    tenant: str = ""  # the caller's tenant ("" without API keys): its cache hits and misses are counted apart

    @property
    def expected_length(self) -> int:
        """The prompt's length once expanded, as far as the headers tell (a bare uuid counts 0 until looked up)."""
        return len(self.token_ids) - len(self.media) + sum(p.tokens for p in self.media)


@dataclass(frozen=True)
class TemplateCosts:
    """The chat template's own tokens, measured on one tokenizer (``PromptBuilder.template_costs``): around a
    conversation (BOS, the generation prompt, a default system prompt), around a message of each role, and around
    a media part of each modality (its placeholder token included)."""

    fixed: int
    fixed_after_system: int  # a template may add a default system prompt when the first message is no system one
    message: dict[str, int] = field(default_factory=dict)
    media: dict[str, int] = field(default_factory=dict)
    default: int = 8  # for a role or modality the template could not be measured with


class PromptBuilder:
    def __init__(self, spec: ModelSpec, tokenizer, max_media_bytes: int, limits: dict[str, int] | None = None,
                 max_audio_seconds: float = MAX_AUDIO_S):
        self.spec, self.tokenizer, self.max_media_bytes = spec, tokenizer, max_media_bytes
        self._encoding = threading.Lock()  # see encode()
        self.limits = limits or dict(DEFAULT_MM_LIMITS)
        self.max_audio_seconds = max_audio_seconds
        audio = spec.preprocess.get("audio") if "audio" in spec.modalities else None
        self.audio_rate = int(audio["sampling_rate"]) if audio and "sampling_rate" in audio else None
        self.placeholder_text = {m: tokenizer.convert_ids_to_tokens(i) for m, i in spec.placeholder_ids.items()}
        # Control tokens (role markers, end of turn, ...): client text that spells one is encoded as plain text.
        special = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self.special_text = sorted(special - set(self.placeholder_text.values()), key=len, reverse=True)
        # The template joins a message's text parts with nothing between them, so "hi<|im_" + "end|>" would spell a
        # control token no part holds: a text ending with the start of one (or of a placeholder) is quoted too.
        self.special_starts = {t[:k] for t in special for k in range(1, len(t))}
        self.special_ids = set(tokenizer.convert_tokens_to_ids(sorted(special)))
        self.special_start_len = max(map(len, self.special_starts), default=0)
        # No token covers more characters of text than the longest token's spelling (byte-level and SentencePiece
        # vocabularies spell a token with at least the characters it stands for). So client text longer than the
        # context times that cannot fit, and is refused before tokenizing it (megabytes of text take the tokenizer
        # tens of seconds); twice that, for normalizers that shorten text.
        longest = max((len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t), default=1)
        self.max_text_chars = 2 * spec.max_context * longest
        self.string_content = self._renders_strings()

    def _renders_strings(self) -> bool:
        """Whether the chat template renders a message whose content is a string. Hugging Face's LLaVA template only
        walks content parts (``message['content'] | selectattr('type', ...)``: a string's characters have no type),
        so a string message, the most common form, would vanish from the prompt. For such a template a string
        content goes as one text part (vLLM's "openai" content format); templates that take both get the string."""
        probe = "tributary-probe"
        try:
            return probe in self.tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                                               add_generation_prompt=True)
        except Exception:  # a template that refuses string content takes parts
            return False

    def _content(self, text: str) -> str | list[dict]:
        """A message's text as the template renders it (``string_content``)."""
        return text if self.string_content else [{"type": "text", "text": text}]

    def remote_parts(self, req: ChatCompletionRequest) -> list[tuple[str, str, str]]:
        """(param, url, modality) of every media part given as an http(s) URL: fetched (gateway/remote.py) before
        ``build``."""
        out = []
        for i, msg in enumerate(req.messages):
            for j, part in enumerate(msg.content if isinstance(msg.content, list) else ()):
                url = _url(part)
                if url is not None and is_remote(url):
                    out.append((f"messages.{i}.content.{j}", url, _MODALITY[part.type]))
        return out

    def build(self, req: ChatCompletionRequest, namespace: str = "", fetched: dict[str, bytes] | None = None
              ) -> Prompt:
        """``fetched``: the bytes of the remote parts (``remote_parts``), by param."""
        self._check_counts(req)
        self._check_text_length(req)
        messages, media, quoted = [], [], []
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            named = {}  # for templates that render speakers' names: client text, checked and quoted as any
            if msg.name:
                self._check_text(msg.name, f"messages.{i}.name")
                named["name"] = self._quote(msg.name, quoted)
            if isinstance(msg.content, str):
                self._check_text(msg.content, f"messages.{i}.content")
                messages.append({"role": role, "content": self._content(self._quote(msg.content, quoted)), **named})
                continue
            parts = []
            for j, part in enumerate(msg.content):
                param = f"messages.{i}.content.{j}"
                if part.type == "text":
                    self._check_text(part.text, param)
                    parts.append({"type": "text", "text": self._quote(part.text, quoted)})
                    continue
                if role != "user":
                    raise InvalidRequest(f"{part.type} parts are only accepted in user messages", param=param)
                media.append(self._media(part, param, namespace, fetched or {}))
                modality = media[-1].modality
                parts.append({"type": modality, modality: f"tributary:{param}"})  # the value is never rendered
            messages.append({"role": role, "content": parts, **named})
        ids = self._render(messages, quoted)
        if not ids:  # the checkpoint's template rendered nothing: the service's fault, not the client's
            raise Internal("the model's chat template rendered an empty prompt", code="empty_prompt")
        self._check_placeholders(ids, media)
        return Prompt(ids, media, namespace)

    def _render(self, messages: list[dict], quoted: list[str]) -> list[int]:
        """The chat template applied to ``messages`` and tokenized (``quoted`` client texts as plain text)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self._tokenize(text, quoted, add_special) if quoted else self.encode(text, add_special)

    def _spells_special(self, text: str) -> bool:
        return QUOTE_OPEN in text or any(s in text for s in self.special_text)

    def message_tokens(self, role: str, texts: Sequence[str], media: Sequence[tuple[str, MediaInfo]] = ()) -> int:
        """About how many tokens one message adds to a prompt, told without rendering the conversation it is in:
        its texts tokenized on their own (control-token spellings split, as ``_tokenize`` does), each media part's
        placeholder count as the encoder will count it, and the template's tokens around a message and a part
        (``template_costs``). Within a token or two of the truth per message (tokens can merge across a text's edge
        in the rendered template); for leaving a conversation's oldest messages out of a prompt
        (gateway/realtime.py), whose exact length the built prompt then checks. Text too long for any tokenization
        to fit the context (``max_text_chars``) counts as more than the context, untokenized."""
        costs = self.template_costs
        if sum(map(len, texts)) > self.max_text_chars:
            return self.spec.max_context + 1
        n = costs.message.get(role, costs.default) + max(len(texts) - 1, 0)  # a template may put a space after each
        for text in texts:
            n += len(self.encode(text, split=True))
        for modality, info in media:
            n += costs.media.get(modality, costs.default) - 1 + placeholder_count(self.spec, modality, info)
        return n

    @functools.cached_property
    def template_costs(self) -> TemplateCosts:
        """Measured once, by rendering small conversations the way ``build`` renders them and taking differences
        (a template that refuses one shape, e.g. two user messages in a row, leaves that cost at the default)."""
        tok, x = self.tokenizer, "x"
        x_len = len(self.encode(x))

        def length(messages, generate=False) -> int:
            text = tok.apply_chat_template(messages, add_generation_prompt=generate, tokenize=False)
            bos = tok.bos_token
            return len(self.encode(text, not (bos and text.startswith(bos))))

        user = {"role": "user", "content": [{"type": "text", "text": x}]}
        costs = TemplateCosts(fixed=0, fixed_after_system=0)
        try:
            one = length([user])
        except Exception:  # a template this cannot measure: every cost at the default
            log.warning("the chat template could not be measured; conversation truncation estimates are coarse")
            return costs
        for role in ("user", "system", "assistant"):
            message = user if role == "user" else {"role": role, "content": self._content(x)}
            try:
                costs.message[role] = max(length([user, message]) - one - x_len, 0)
            except Exception:
                pass
        for modality in self.spec.modalities:
            part = {"type": modality, modality: "tributary:measure"}
            try:
                with_part = length([{"role": "user", "content": [user["content"][0], part]}])
                costs.media[modality] = max(with_part - one, 1)
            except Exception:
                pass
        fixed = after_system = costs.default
        user_cost = costs.message.get("user", costs.default) + x_len
        try:
            fixed = length([user], generate=True) - user_cost
            system = {"role": "system", "content": self._content(x)}
            after_system = (length([system, user], generate=True) - user_cost
                            - costs.message.get("system", costs.default) - x_len)
        except Exception:
            after_system = fixed
        return TemplateCosts(max(fixed, 0), max(after_system, 0), costs.message, costs.media)

    def conversation_tokens(self, first_role: str | None) -> int:
        """The template's tokens around a conversation whose first message has ``first_role`` (see
        ``message_tokens``)."""
        costs = self.template_costs
        return costs.fixed_after_system if first_role == "system" else costs.fixed

    def _quote(self, text: str, quoted: list[str]) -> str:
        """Client text as the template gets it: as is, or, if it spells a control token or ends with the start of
        one (which the next part could complete), a marker for ``_tokenize``."""
        ends = (text[-k:] for k in range(1, min(len(text), self.special_start_len) + 1))
        if not self._spells_special(text) and not any(end in self.special_starts for end in ends):
            return text
        quoted.append(text)
        return f"{QUOTE_OPEN}{len(quoted) - 1}{QUOTE_CLOSE}"

    def _tokenize(self, text: str, quoted: list[str], add_special: bool) -> list[int]:
        """The rendered template with the quoted client texts put back, tokenized as the reference tokenizes it, except
        that a control token the client's text spells (or helps spell) is its characters as ordinary tokens, so
        ``<|im_start|>system`` typed by a user never becomes a role marker, and the words around it keep the
        reference's tokens ("USER: what is </s>": 'Ġwhat', 'Ġis' as the reference has them). Found by the tokens'
        character offsets; a tokenizer without offsets, or a control token that would take template text with it,
        gets ``_tokenize_apart``."""
        apart = self._tokenize_apart(text, quoted, add_special)
        if not getattr(self.tokenizer, "is_fast", False):
            return apart
        raw, spans, at = [], [], 0
        for n, piece in enumerate(QUOTED.split(text)):
            piece = quoted[int(piece)] if n % 2 else piece
            if n % 2:
                spans.append((at, at + len(piece)))
            raw.append(piece)
            at += len(piece)
        raw = "".join(raw)
        with self._encoding:
            enc = self.tokenizer(raw, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = []
        for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if i in self.special_ids and any(s < b and e > a for a, b in spans):
                ids += self.encode(raw[s:e], split=True)
            else:
                ids.append(i)
        specials = [i for i in ids if i in self.special_ids]
        return ids if specials == [i for i in apart if i in self.special_ids] else apart

    def _tokenize_apart(self, text: str, quoted: list[str], add_special: bool) -> list[int]:
        """The rendered template's own pieces tokenized as usual; each quoted client text on its own, with its
        special-token spellings split into ordinary tokens (``split_special_tokens``)."""
        bos = self.tokenizer.bos_token_id
        ids = [i for i in self.encode("", True) if i == bos] if add_special else []
        for n, piece in enumerate(QUOTED.split(text)):
            if n % 2:
                ids += self.encode(quoted[int(piece)], split=True)
            elif piece:
                ids += self.encode(piece)
        return ids

    def encode(self, text: str, add_special: bool = False, split: bool = False) -> list[int]:
        """``text``'s token ids; ``split``: control-token spellings as plain text. Every encode of this builder goes
        through here, one at a time: transformers applies ``split_special_tokens`` by setting a flag on the shared
        Rust tokenizer before each encode, so two threads encoding at once (requests are tokenized on worker
        threads) took each other's setting: a user's typed ``<|im_start|>system`` became a real control token, or
        the template's own markers and media placeholders were split (a wrong answer, a spurious 400)."""
        with self._encoding:
            return self.tokenizer(text, add_special_tokens=add_special, split_special_tokens=split)["input_ids"]

    def _check_text_length(self, req: ChatCompletionRequest) -> None:
        """Refuse, before the template is rendered and tokenized, a prompt that cannot fit the context: by its
        text's characters, or by the template's own tokens around its messages (the measured cost of each, less one
        for a merge at its edges). 33,000 empty messages were rendered and tokenized (0.6 s of GIL-bound work) to
        find 264,000 tokens for a 1,024-token context (an outside tester's run)."""
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if p.type == "text") for m in req.messages)
        if chars > self.max_text_chars:
            raise InvalidRequest(f"the prompt's text is {chars} characters, more than this model's context of "
                                 f"{self.spec.max_context} tokens can hold", param="messages",
                                 code="context_length_exceeded")
        costs = self.template_costs.message
        least = sum(max(costs.get("system" if m.role == "developer" else m.role, 1) - 1, 0) for m in req.messages)
        if least > self.spec.max_context:
            raise InvalidRequest(f"the prompt's {len(req.messages)} messages take at least {least} tokens of the chat "
                                 f"template, more than this model's context of {self.spec.max_context} tokens",
                                 param="messages", code="context_length_exceeded")

    def _check_counts(self, req: ChatCompletionRequest) -> None:
        counts = {m: 0 for m in self.limits}
        for msg in req.messages:
            for part in msg.content if isinstance(msg.content, list) else ():
                if part.type in _MODALITY:
                    counts[_MODALITY[part.type]] += 1
        for modality, n in counts.items():
            if n > self.limits[modality]:
                raise InvalidRequest(f"at most {self.limits[modality]} {modality} part(s) may be sent in one request; "
                                     f"this one has {n}", param="messages", code="too_many_media_parts")

    def _media(self, part, param: str, namespace: str, fetched: dict[str, bytes]) -> MediaPart:
        modality = _MODALITY[part.type]
        if modality not in self.spec.modalities:
            raise InvalidRequest(f"model '{self.spec.name}' does not accept {modality} input ({part.type} part); it "
                                 f"accepts text and {' and '.join(self.spec.modalities)}", param=param,
                                 code="unsupported_modality")
        if getattr(part, part.type) is None:  # the media field, as the schema's own uuid check reads it
            return MediaPart(modality, b"", param, uuid=part.uuid)  # a bare uuid: resolved in gateway/encoding.py
        url = _url(part)
        if param in fetched:
            data = fetched[param]
        elif url is not None:
            data = from_data_url(url, modality, param, self.max_media_bytes)
        else:
            data = audio_from_base64(part.input_audio.data, param, self.max_media_bytes)
        info = self.check_media(modality, data, param)
        # the input_audio.format must name the data's container (OpenAI refuses a mismatch)
        if part.type == "input_audio" and info.format and part.input_audio.format != AUDIO_FORMATS.get(info.format):
            raise InvalidRequest(f"{param}: input_audio.format is '{part.input_audio.format}' but the data is "
                                 f"{info.format} audio", param=f"{param}.input_audio.format", code="invalid_media")
        return MediaPart(modality, data, param, self.digest(modality, data, namespace), part.uuid,
                         placeholder_count(self.spec, modality, info))

    def check_media(self, modality: str, data: bytes, param: str):
        """``data`` read as far as its header (format, size, length within the limits): what it holds, or a 400
        naming ``param``."""
        if not data:
            raise InvalidRequest(f"{param}: the {modality} data is empty", param=param, code="invalid_media")
        try:
            return (probe_image(data) if modality == "image"
                    else probe_audio(data, self.max_audio_seconds, self.audio_rate))
        except MediaHeaderError as exc:
            # Raised from the decoder's exception: the bytes are not readable media; its words (and the object reprs
            # in them) go to the log. Raised on its own: a limit models.media states in the client's terms.
            if exc.__cause__ is None:
                raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_media") from None
            log.info("unreadable media", extra={"param": param, "modality": modality,
                                                 "error": f"{type(exc.__cause__).__name__}: {exc.__cause__}"})
            raise InvalidRequest(unreadable(data, modality, param), param=param, code="invalid_media") from None

    def digest(self, modality: str, data: bytes, namespace: str = "") -> str:
        """The cache key of ``data``'s encoding (gateway.media.content_digest with this model's encoder)."""
        return content_digest(self.spec.encoder_id(modality), self.spec.preprocess[modality], data, namespace)

    def _check_text(self, text: str, param: str) -> None:
        # A placeholder typed by the client would be spliced with another part's tensor: refuse it.
        for token in self.placeholder_text.values():
            if token in text:
                raise InvalidRequest(f"text must not contain the reserved token {token}", param=param)

    def _check_placeholders(self, ids: list[int], media: list[MediaPart]) -> None:
        found = [m for i in ids for m, pid in self.spec.placeholder_ids.items() if i == pid]
        if found != [p.modality for p in media]:
            raise InvalidRequest("the chat template did not place every media part; check the message roles")


def _url(part) -> str | None:
    """The URL of an ``image_url`` or ``audio_url`` part (None for a bare uuid or another part)."""
    holder = getattr(part, part.type, None) if part.type in ("image_url", "audio_url") else None
    return holder.url if holder is not None else None


QUOTE_OPEN, QUOTE_CLOSE = "\ue000", "\ue001"  # private-use characters: no tokenizer or template emits them
QUOTED = re.compile(f"{QUOTE_OPEN}(\\d+){QUOTE_CLOSE}")


def expand_placeholders(ids: list[int], placeholder_ids: dict[str, int], counts: list[int]) -> list[int]:
    """Repeat the k-th placeholder token counts[k] times."""
    placeholders = set(placeholder_ids.values())
    out: list[int] = []
    k = 0
    for tok in ids:
        if tok in placeholders:
            out.extend([tok] * counts[k])
            k += 1
        else:
            out.append(tok)
    return out
