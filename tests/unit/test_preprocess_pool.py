"""[gpu-encoders]: the encoder worker preprocesses on a thread pool (batch N+1 while batch N runs its forward); what
the pool produces is bitwise what the preprocessor gives alone (whose parity with the checkpoint's processor
tests/unit/test_processor_parity.py and test_families.py hold), with many items in flight at once."""

from __future__ import annotations

import threading

import pytest
import torch

from encoders.loader import load_preprocessor, load_runtime
from encoders.preprocess import Prepared
from encoders.worker import EncoderConfig, EncoderWorker
from router import messages as m
from tests.media import png_bytes, wav_bytes


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_the_pool_gives_the_preprocessors_output_bitwise(tiny_spec, modality):
    cfg = EncoderConfig(redis_url="redis://127.0.0.1:1", modality=modality, preprocess_threads=4)
    pre = load_preprocessor(tiny_spec, modality)
    worker = EncoderWorker(cfg, pre, load_runtime(tiny_spec, modality), threading.Event(),
                           tiny_spec.encoder_id(modality))  # no Redis call is made here
    try:
        if modality == "image":
            media = [png_bytes(20 + 7 * i, 30 + 3 * i, seed=i) for i in range(16)]
        else:
            media = [wav_bytes(0.2 + 0.15 * i, seed=i) for i in range(8)]
        media.append(b"not media at all")
        jobs = [m.EncodeJob(request_id=f"r{i}", job_id=f"j{i}", modality=m.Modality(modality), encoder_id="e",
                            digest="d", blob_key="b", reply_to="x", deadline=0.0) for i in range(len(media))]
        results = [f.result() for f in [worker.pool.submit(worker._timed, blob, job)
                                         for blob, job in zip(media, jobs)]]
        for blob, (got, ms) in zip(media[:-1], results):
            want = pre(blob)
            assert isinstance(got, Prepared) and ms >= 0
            assert torch.equal(got.data, want.data) and got.data.dtype == want.data.dtype
            assert (got.num_tokens, got.length) == (want.num_tokens, want.length)
        bad, _ = results[-1]
        assert bad[0] == m.ErrorCode.BAD_MEDIA and modality in bad[1]  # bad media is this item's failure alone
    finally:
        worker.pool.shutdown()
