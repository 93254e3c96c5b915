"""Every message that crosses a tier boundary, versioned, with one encode/decode path (msgpack via msgspec).

Messages are small: token ids, keys and counts. Tensors never travel inside them; they live in the tensor cache
(``cache.keys.Keys.tensor``) and messages carry their keys. Each struct is tagged with its type name, so a stream
can carry a union (the gateway's reply stream carries encode results and token events) and a reader rejects anything
it does not know instead of guessing. ``WIRE_VERSION`` is bumped on any incompatible change; a reader refuses other
versions with a clear error.
"""

from __future__ import annotations

import enum
from typing import Literal, Union

import msgspec

WIRE_VERSION = 2


class Modality(str, enum.Enum):
    IMAGE = "image"
    AUDIO = "audio"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token, a stop token id or (decided by the gateway) a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    CANCELLED = "cancelled"  # the gateway asked to stop (client gone, stop string)
    ERROR = "error"  # the tier failed this request; ``error`` says why


class ErrorCode(str, enum.Enum):
    """Typed failure reasons a worker reports; the gateway alone maps them to HTTP statuses."""

    BAD_MEDIA = "bad_media"  # the client's bytes did not decode: a 4xx
    MEDIA_EXPIRED = "media_expired"  # a blob or tensor expired before it was used: retryable
    BAD_PLAN = "bad_plan"  # the plan does not fit the model (placeholder count, context length): a 4xx
    DEADLINE = "deadline"  # the work waited in a queue past its deadline: the gateway has given up by now
    CANCELLED = "cancelled"  # the gateway withdrew the request before it started
    WORKER_LOST = "worker_lost"  # the backbone running this attempt died; its gateway migrates the request
    GAVE_UP = "gave_up"  # delivered to too many workers that died: dead-lettered (a 500)
    CACHE_FULL = "cache_full"  # Redis refused to store the output (maxmemory under noeviction): a 503, retryable
    INTERNAL = "internal"  # a bug or a broken worker: a 5xx


class Message(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    v: int = WIRE_VERSION


class JobInput(str, enum.Enum):
    MEDIA = "media"  # the client's encoded bytes (an image file, an audio file): the encoder decodes them
    FEATURES = "features"  # audio features computed while a Realtime client streamed the clip (models.audio)


class EncodeJob(Message, kw_only=True):
    """Gateway -> encoder tier (``jobs:<modality>`` stream): encode one media part."""

    request_id: str
    job_id: str
    modality: Modality
    encoder_id: str  # model fingerprint + component; part of the tensor key
    digest: str  # content hash of (encoder_id, preprocessing config, bytes)
    blob_key: str  # where the raw bytes (or the features) wait (short TTL)
    reply_to: str  # the gateway's reply stream
    deadline: float  # unix seconds; an encoder drops jobs past it
    # What the blob holds. Features give the same tensor the media would (the digest is the media's), so either
    # may serve a waiter. An encoder older than this field would decode features as media: upgrade encoders first.
    input: JobInput = JobInput.MEDIA
    # The tensor's lifetime in the cache, in seconds; 0: the encoder's --tensor-ttl. Gateways with the media cache
    # off set it to as long as their request may need the tensor (an encoder older than this field keeps it its
    # whole TTL).
    ttl_s: int = 0


class EncodeDone(Message, kw_only=True):
    """Encoder -> every gateway waiting on ``tensor_key``: the tensor is in the cache.

    ``request_id`` / ``job_id`` are those of the request that queued the job (for logs): the same message goes to
    every waiting gateway, whichever request it serves.
    """

    request_id: str
    job_id: str
    tensor_key: str
    num_tokens: int  # how many placeholder tokens this part expands to


class EncodeFailed(Message, kw_only=True):
    """Encoder -> every gateway waiting on ``tensor_key``: it could not be produced, and why."""

    request_id: str
    job_id: str
    tensor_key: str
    code: ErrorCode
    error: str


class MediaRef(Message, kw_only=True):
    """One media part of a prompt, in prompt order; its placeholder tokens are already expanded in the token ids."""

    modality: Modality
    tensor_key: str
    num_tokens: int


class SamplingParams(Message, kw_only=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # The client named no budget: ``max_tokens`` is the gateway's default, which a backbone whose KV pool holds less
    # than the context lowers to what the pool holds (a budget the client named is refused instead).
    default_budget: bool = False


class PromptPlan(Message, kw_only=True):
    """Gateway -> backbone (``gen`` stream): everything the first shard needs to build ``inputs_embeds``.

    ``token_ids`` already holds ``num_tokens`` copies of each media part's placeholder id, in the same order as
    ``media``; the first shard splices each part's tensor rows into those positions.
    """

    request_id: str
    reply_to: str
    token_ids: list[int]
    media: list[MediaRef] = []
    sampling: SamplingParams
    deadline: float  # unix seconds; a plan taken after it is dropped with an error event
    # Request migration (gateway/tiers.py): a continuation plan ends ``token_ids`` with the ``resumed`` tokens the
    # client already has, its ``sampling.max_tokens`` is what is left, and its sampler starts at draw ``resumed``.
    attempt: int = 0
    resumed: int = 0
    # The tenant's cache namespace (gateway/auth.py; "" without keys, or with a shared cache): only prompts with the
    # same salt share KV blocks in a backbone's prefix cache (backbone/kv.py). Absent from older gateways: "".
    cache_salt: str = ""


class TokenEvent(Message, kw_only=True):
    """Backbone -> gateway: the tokens one step produced for one request, and how it ended if it did."""

    request_id: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # total so far, including these
    finish: FinishReason | None = None
    code: ErrorCode | None = None
    error: str | None = None
    attempt: int = 0  # the plan attempt this event belongs to; the gateway ignores stale attempts
    worker: str = ""  # the backbone consumer running it (the gateway watches its liveness)
    # The completion tokens the request may reach, when the backbone lowered the gateway's default budget to what
    # its KV pool holds (SamplingParams.default_budget): a continuation on another replica asks no more than that
    # (a backbone that does not lower budgets would refuse the full default; ignored by gateways that predate it).
    budget: int | None = None
    # A BAD_PLAN refusal because the request does not fit this backbone's KV pool (smaller than the model's context):
    # "prompt" (the prompt alone) or "budget" (the prompt and the max_tokens the client named). The gateway answers it
    # as context_length_exceeded, naming the field (ignored by gateways that predate it: a 400 with no code).
    limit: Literal["prompt", "budget"] | None = None
    # Prompt tokens this attempt took from the backbone's prefix cache instead of computing them (usage's
    # prompt_tokens_details.cached_tokens; 0 from backbones that predate it).
    cached_tokens: int = 0
    # The backbone's compute dtype ("bfloat16", "float32", ...): answers depend on it, so it is part of the answer's
    # system_fingerprint ("" from backbones that predate it, ignored by gateways that do).
    dtype: str = ""


ReplyMessage = Union[EncodeDone, EncodeFailed, TokenEvent]


class WireError(ValueError):
    """Bytes that are not a message this version understands."""


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[object, msgspec.msgpack.Decoder] = {}


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, kind):
    """Decode bytes as ``kind`` (a Message subclass or a Union of them); refuse other wire versions."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        msg = dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"cannot decode {getattr(kind, '__name__', kind)}: {exc}") from exc
    if msg.v != WIRE_VERSION:
        raise WireError(f"wire version {msg.v} is not supported (this build speaks {WIRE_VERSION})")
    return msg


def loose(data: bytes) -> dict:
    """The fields of a message this build refuses (another wire version's), as plain values: msgpack decoded to
    dicts, lists, strings and numbers, nothing else built from the bytes; ``{}`` if they are not a msgpack map. Only
    to name the refusal to whoever sent it, never to do the work."""
    try:
        fields = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return {}
    return fields if isinstance(fields, dict) else {}
