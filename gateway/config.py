"""Gateway settings: one dataclass, each field documented; read from flags or ``TRIBUTARY_*`` env at start-up."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from models.media import MAX_AUDIO_S


@dataclass
class GatewayConfig:
    model_dir: str
    redis_url: str
    prefix: str = "trib"  # Redis key prefix shared by every tier of one cluster
    served_name: str | None = None  # model id clients send; defaults to the checkpoint folder's name
    max_body_bytes: int = 32 * 1024 * 1024  # larger requests get a 413
    max_media_bytes: int = 16 * 1024 * 1024  # one decoded image or audio clip
    blob_ttl_s: int = 300  # media bytes waiting for an encoder
    tensor_ttl_s: int = 3600  # refreshed on every cache hit
    encode_timeout_s: float = 60.0  # bound on waiting for all media of a request
    lease_ttl_s: int = 30  # single-flight lease on one encode; a waiter retakes it after this if nothing came
    first_token_timeout_s: float = 120.0  # bound on queueing + prefill
    # A queued request whose tier has had no live worker for this long gets a 503 no_live_worker: its worker died
    # after it was admitted (new requests are refused at once), and it waited for its whole encode or first-token
    # timeout (an outside tester's 120 s). Long enough for a restart to take over its queued work.
    no_worker_timeout_s: float = 30.0
    token_timeout_s: float = 30.0  # bound on the gap between two token events (CLI: >= 10, see HELD_EVENT_S)
    cancel_ttl_s: int = 600
    default_max_tokens: int = 256  # when the client sends none (clamped to the context left)
    # Media parts one request may carry, per modality (vLLM's --limit-mm-per-prompt); more is a 400.
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MM_LIMITS))
    max_audio_seconds: float = MAX_AUDIO_S  # longer clips are a 400 (read from the header, before any decoding)
    instance_id: str = ""  # echoed by /ready, so a supervisor can tell its own gateway from whatever holds the port
    # Recovery and overload (docs/architecture.md, "Recovery").
    migration_limit: int = 3  # how often one request may move to another backbone after its worker died (0: never)
    max_inflight: int = 256  # requests this gateway serves at once; more get a 503 server_overloaded
    max_connections: int = 0  # open HTTP/WebSocket connections; more get a 503 (0: the fd limit less a reserve)
    max_backlog: int = 1024  # unread entries a tier's stream may hold before new requests get a 503 server_overloaded
    # How long a tier's oldest unread job may have waited before new requests needing the tier get a 503
    # server_overloaded (they would wait as long, and time out): 0 is half the tier's own bound, encode_timeout_s for
    # the encoders, first_token_timeout_s for the backbone.
    max_queue_wait_s: float = 0.0
    body_timeout_s: float = 30.0  # a request body not received within this gets a 408 (slow clients hold memory)
    header_timeout_s: float = 15.0  # a connection's request headers, from its opening or the request's first byte
    send_timeout_s: float = 30.0  # a response its client has not read for this long is cut (gateway/server.py)
    lease_s: int = 15  # this gateway's lease; when it lapses workers cancel its work and its reply stream expires
    # The encoders' compute and wire dtypes (wire default: compute), one for all (``bfloat16``) or per modality
    # (``image=bfloat16,audio=float32``): part of every cached tensor's identity, so they must be what the encoders
    # run (an encoder refuses jobs for another precision).
    encoder_dtype: str = "float32"
    encoder_wire_dtype: str | None = None
    # Who may call (gateway/auth.py, gateway/origin.py). Keys themselves come from TRIBUTARY_API_KEYS, never a flag.
    api_key_file: str | None = None  # lines of "tenant sha256-hex-of-key", re-read when it changes
    shared_cache: str | None = None  # tenants that share cached encodings: "a,b;c,d"
    # False: no request reuses another's encodings (each is keyed in a namespace of its own; the tensors still go
    # through Redis, and expire after ``cache_ttl_s``). For measuring what the cache buys, or deployments that must
    # not reuse one caller's media for another request; media uuids then never resolve.
    media_cache: bool = True
    bind_host: str = "127.0.0.1"  # the address uvicorn listens on: loopback means loopback Host names only
    allowed_hosts: str | None = None  # Host names served (comma-separated; "*": any)
    allowed_origins: str | None = None  # web origins allowed (CORS and the Origin check; comma-separated; "*": any)
    allowed_media_domains: str | None = None  # host names http(s) media may be fetched from (gateway/remote.py)
    rate_limit_rpm: int = 0  # per tenant, requests per minute (gateway/ratelimit.py; needs API keys; 0: none)
    rate_limit_tpm: int = 0  # per tenant, prompt + completion tokens per minute
    media_fetch_timeout_s: float = 10.0  # one remote media part, redirects included

    def __post_init__(self) -> None:
        from models.spec import parse_encoder_dtypes

        parse_encoder_dtypes(self.encoder_dtype)  # a bad value is an error at start
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise ValueError("rate limits must be >= 0 (0: none)")
        parse_encoder_dtypes(self.encoder_wire_dtype)
        for name in ("max_body_bytes", "max_media_bytes", "blob_ttl_s", "tensor_ttl_s", "default_max_tokens",
                     "lease_ttl_s", "max_inflight", "max_backlog", "lease_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_connections < 0:
            raise ValueError(f"max_connections must be >= 0, got {self.max_connections}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.lease_s < 3:
            raise ValueError(f"lease_s must be >= 3 (it is refreshed every second), got {self.lease_s}")
        for name in ("encode_timeout_s", "first_token_timeout_s", "token_timeout_s", "no_worker_timeout_s",
                     "max_audio_seconds",
                     "body_timeout_s", "header_timeout_s", "send_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_queue_wait_s < 0:
            raise ValueError(f"max_queue_wait_s must be >= 0 (0: half the tier's timeout), got {self.max_queue_wait_s}")
        self.limit_mm_per_prompt = parse_mm_limits(self.limit_mm_per_prompt)

    @property
    def cache_ttl_s(self) -> int:
        """How long an encoder output stays in Redis (set on the jobs, refreshed by each lookup): ``tensor_ttl_s``;
        with the media cache off, only as long as its request may need it (its encode and its first token, and a
        minute for a migration's prefill; a Realtime session's later turn past that encodes again), never longer:
        no other request can look it up, and an hour of each request's tensors filled Redis (an outside tester's
        run: 128 MB in 8 minutes)."""
        if self.media_cache:
            return self.tensor_ttl_s
        return min(self.tensor_ttl_s, math.ceil(self.encode_timeout_s + self.first_token_timeout_s) + 60)

    def queue_wait_limit(self, tier: str) -> float:
        """Seconds ``tier``'s oldest unread job may have waited before admission refuses requests needing it."""
        if self.max_queue_wait_s:
            return self.max_queue_wait_s
        return (self.first_token_timeout_s if tier == "backbone" else self.encode_timeout_s) / 2


DEFAULT_MM_LIMITS = {"image": 8, "audio": 4}


def parse_mm_limits(value: str | dict) -> dict[str, int]:
    """``'{"image": 4, "audio": 1}'`` (vLLM's syntax) or a dict -> the limits, the defaults filling what is not
    named; ValueError naming what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"limit_mm_per_prompt must be a JSON object like '{{\"image\": 4}}': {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("limit_mm_per_prompt must be a JSON object like '{\"image\": 4, \"audio\": 1}'")
    out = dict(DEFAULT_MM_LIMITS)
    for modality, n in value.items():
        if modality not in DEFAULT_MM_LIMITS:
            raise ValueError(f"limit_mm_per_prompt: unknown modality {modality!r} (known: image, audio)")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"limit_mm_per_prompt: {modality} must be an integer >= 0, got {n!r}")
        out[modality] = n
    return out
