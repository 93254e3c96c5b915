"""[gpu-encoders]: the encoder worker preprocesses on a thread pool (batch N+1 while batch N runs its forward); what
the pool produces is bitwise what the preprocessor gives alone (whose parity with the checkpoint's processor
tests/unit/test_processor_parity.py and test_families.py hold), with many items in flight at once."""

from __future__ import annotations

import threading
import time

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


def hanging_worker(tiny_spec, threads: int, stop: threading.Event | None = None):
    """(worker, its preprocessor, the event that releases it): an image encoder worker whose preprocessing of the
    bytes ``b"hang"`` hangs until that event is set, with a 0.5 s preprocessing limit (no Redis call is made)."""
    hang = threading.Event()
    pre = load_preprocessor(tiny_spec, "image")

    def preprocess(blob: bytes):
        if blob == b"hang":
            hang.wait(30)
        return pre(blob)

    cfg = EncoderConfig(redis_url="redis://127.0.0.1:1", modality="image", preprocess_threads=threads,
                        preprocess_timeout_s=0.5)
    worker = EncoderWorker(cfg, preprocess, load_runtime(tiny_spec, "image"), stop or threading.Event(),
                           tiny_spec.encoder_id("image"))
    return worker, pre, hang


def staged(worker, blobs: list[bytes]):
    """``blobs`` staged on the worker's pool as ``_stage`` stages a batch."""
    from encoders.worker import Staged

    jobs = [type("Job", (), {"msg": m.EncodeJob(request_id=f"r{i}", job_id=f"j{i}", modality=m.Modality.IMAGE,
                                                encoder_id="e", digest="d", blob_key="b", reply_to="x",
                                                deadline=0.0)})() for i in range(len(blobs))]
    futures = [worker.pool.submit(worker._timed, blob, job.msg) for blob, job in zip(blobs, jobs)]
    return Staged(None, jobs, futures, time.perf_counter(), None, [(b, j.msg) for b, j in zip(blobs, jobs)])


def test_an_item_whose_preprocessing_hangs_fails_alone_and_the_worker_stops_once_its_threads_are_stuck(tiny_spec):
    """A decoder hung on hostile bytes held the worker's loop (future.result() without a bound) until the liveness
    watchdog killed it, about 90 s, and its job was then reclaimed to hang the next worker, three times (an outside
    reviewer's reading). Now the item fails alone after preprocess_timeout_s, new work goes to a fresh pool, and once
    as many threads are stuck as the pool has the worker stops itself (exit code 3) to be restarted."""
    stop = threading.Event()
    worker, _, hang = hanging_worker(tiny_spec, 2, stop)
    pools = []
    try:
        for round_ in range(2):
            pool = worker.pool
            pools.append(pool)
            batch = staged(worker, [png_bytes(20, 30, seed=1), b"hang", png_bytes(24, 24, seed=2)])
            got = worker._collect(batch)
            assert time.perf_counter() - batch.t0 < 5
            assert isinstance(got[0][0], Prepared) and isinstance(got[2][0], Prepared)
            assert got[1][0] == (m.ErrorCode.BAD_MEDIA, "this image could not be decoded within 0.5 s")
            assert worker.pool is not pool and worker.stuck == round_ + 1
            assert stop.is_set() == (round_ == 1) and worker.exit_code == (3 if round_ == 1 else 0)
    finally:
        hang.set()
        for pool in [*pools, worker.pool]:  # the threads left behind finish (and log) before the test ends
            pool.shutdown(wait=True)


def test_items_queued_behind_a_hung_one_run_again_on_the_fresh_pool_not_refused_with_it(tiny_spec):
    """An outside tester's JPEG of 3,000 scans (43 s to decode) on a one-thread pool: the images queued behind it
    shared its batch's deadline and were refused as undecodable within 20 s, valid as they were. Items that had
    not started by the deadline now run again on the fresh pool; only the hung one fails."""
    worker, pre, hang = hanging_worker(tiny_spec, 1)
    pool = worker.pool
    try:
        blobs = [b"hang", png_bytes(20, 30, seed=1), png_bytes(24, 24, seed=2)]
        batch = staged(worker, blobs)
        got = worker._collect(batch)
        assert time.perf_counter() - batch.t0 < 5
        assert got[0][0] == (m.ErrorCode.BAD_MEDIA, "this image could not be decoded within 0.5 s")
        assert isinstance(got[1][0], Prepared) and isinstance(got[2][0], Prepared), got
        assert torch.equal(got[1][0].data, pre(blobs[1]).data)
        assert worker.stuck == 1 and worker.pool is not pool
    finally:
        hang.set()
        for p in (pool, worker.pool):
            p.shutdown(wait=True)


def test_a_pool_thread_still_running_at_exit_is_named_so_the_worker_leaves_without_it():
    """A decode still running as the worker stops (Redis failed meanwhile: its future could not be cancelled) was
    neither counted stuck nor waited for with a bound: the interpreter's exit joined it, and the worker ignored
    SIGTERM until SIGKILL (an outside reviewer's reading). ``serve`` leaves with os._exit when any is named."""
    from concurrent.futures import ThreadPoolExecutor

    from encoders.worker import busy_threads

    hang = threading.Event()
    pool = ThreadPoolExecutor(2, thread_name_prefix="preprocess-exit-test")  # named as the worker's pool is
    pool.submit(hang.wait, 30)
    pool.submit(lambda: None).result()
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        t0 = time.monotonic()
        # the idle one ended with its pool; the hung one did not
        assert busy_threads(0.3, ("preprocess-exit-test",)) == ["preprocess-exit-test_0"]
        assert time.monotonic() - t0 < 2
    finally:
        hang.set()
    assert busy_threads(5, ("preprocess-exit-test",)) == []
