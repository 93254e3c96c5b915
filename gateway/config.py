"""Gateway settings: one dataclass, each field documented; read from flags or ``TRIBUTARY_*`` env at start-up."""

from __future__ import annotations

from dataclasses import dataclass


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
    token_timeout_s: float = 30.0  # bound on the gap between two token events
    cancel_ttl_s: int = 600
    default_max_tokens: int = 256  # when the client sends none (clamped to the context left)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_media_bytes", "blob_ttl_s", "tensor_ttl_s", "default_max_tokens",
                     "lease_ttl_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encode_timeout_s", "first_token_timeout_s", "token_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
