"""Prometheus metrics of the worker tiers, and serving a registry on a worker's ``--metrics-port``.

Every process keeps its metrics in its own :class:`CollectorRegistry` (never prometheus_client's global one), so
nothing registered by a library or a test in the same process collides with them. Names follow vLLM's with a
``tributary_`` prefix where vLLM has one; README.md ("Metrics") lists them all, and gateway/metrics.py holds the
gateway's.

- **Encoder** (:class:`EncoderMetrics`, observed by encoders/worker.py once per batch, never per item on a hot path):
  jobs in hand, seconds and batch size of each forward batch, jobs by outcome.
- **Backbone** (:class:`BackboneCollector`): read when scraped, from the worker's own state (running and waiting
  sequences, the KV pool's used blocks, preemptions, steps); nothing is done per step for them.

A worker serves its registry with :func:`serve` on its own port (``--metrics-port``; ``--metrics-host``, default
127.0.0.1). ``PROMETHEUS_MULTIPROC_DIR`` is for a gateway run as several processes (gateway/metrics.py): a worker is
one process, so its metrics are built in memory even when that variable is set (:func:`in_memory`), and never end up
in the files a gateway's ``/metrics`` merges.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds of one encoder forward batch (a CPU tiny model: milliseconds; a big vision tower on a CPU: seconds).
ENCODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Outcomes of an encode job: ``encoded``, the error code its failure carries (router/messages.ErrorCode),
# ``undecodable`` (not a job message: dropped unanswered) or ``not_stored`` (encoded, but its Redis node did not answer:
# its gateway was told to ask again).
JOB_OUTCOMES = ("encoded", "bad_media", "internal", "deadline", "media_expired", "cancelled", "gave_up",
                "undecodable", "cache_full", "not_stored")


@contextlib.contextmanager
def in_memory() -> Iterator[None]:
    """Metrics (and label children) created inside are kept in this process's memory even when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (prometheus_client picks file-backed values for every metric then)."""
    was = values.ValueClass
    values.ValueClass = values.MutexValue
    try:
        yield
    finally:
        values.ValueClass = was


class EncoderMetrics:
    """One encoder worker's metrics (one modality: every label child is created up front, in memory)."""

    def __init__(self, modality: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        with in_memory():
            self.in_flight = Gauge("tributary_encoder_in_flight_jobs", "Jobs this encoder holds (read, being "
                                   "preprocessed or encoded, not yet answered)", ["modality"],
                                   registry=r).labels(modality)
            self.encode_seconds = Histogram("tributary_encoder_encode_seconds", "Seconds of one forward batch "
                                            "(encoder + projector), from its launch to its outputs on the host",
                                            ["modality"], buckets=ENCODE_BUCKETS, registry=r).labels(modality)
            self.preprocess_wait_seconds = Histogram(
                "tributary_encoder_preprocess_wait_seconds", "Seconds a batch's forward waited for its items' "
                "decoding and preprocessing (what the pool did not finish during the previous batch)", ["modality"],
                buckets=ENCODE_BUCKETS, registry=r).labels(modality)
            self.publish_seconds = Histogram(
                "tributary_encoder_publish_seconds", "Seconds to answer a batch in Redis (ack, store and tell), on the "
                "publishing thread, overlapped with the next batch's forward", ["modality"], buckets=ENCODE_BUCKETS,
                registry=r).labels(modality)
            self.publish_wait_seconds = Histogram(
                "tributary_encoder_publish_wait_seconds", "Seconds the loop waited, a batch encoded, for the batch "
                "before it to be answered in Redis (what the forward did not hide)", ["modality"],
                buckets=ENCODE_BUCKETS, registry=r).labels(modality)
            self.batch_size = Histogram("tributary_encoder_batch_size", "Items in one forward batch", ["modality"],
                                        buckets=BATCH_BUCKETS, registry=r).labels(modality)
            jobs = Counter("tributary_encoder_jobs", "Encode jobs answered, by outcome (encoded, or the failure's "
                           "error code)", ["modality", "outcome"], registry=r)
            self.jobs = {outcome: jobs.labels(modality, outcome) for outcome in JOB_OUTCOMES}

    def finished(self, outcomes: dict[str, int]) -> None:
        """Count a batch's answers once Redis took them (``outcome -> jobs``)."""
        for outcome, n in outcomes.items():
            child = self.jobs.get(outcome)
            if child is not None and n:
                child.inc(n)


class BackboneCollector(Collector):
    """The backbone's scheduler as vLLM reports it, read when scraped (each callable is called on the scraping
    thread; they read lengths and counters only):

    - ``kv_usage()``: used blocks / blocks of the paged KV pool, 0..1 (vLLM's kv_cache_usage_perc);
    - ``running()``: sequences started and not preempted (vLLM's num_requests_running);
    - ``waiting()``: plans read from the queue and not started, plus preempted sequences waiting for blocks again
      (vLLM's num_requests_waiting; entries nobody has read yet are the queue's lag, gateway/metrics.py);
    - ``preemptions()`` and ``steps()``: counters since the process started;
    - ``engine`` (backbone/engine.Engine): positions computed by kind (decode, prompt), the steps its step budget
      timed and their seconds (launch to answers on the host), and the step budget's prompt positions per step beside
      4 decodes (vLLM's iteration_tokens_total, in sums: their rates give mean step time and chunk size), and the
      prefix cache's hits (positions taken from it) and registered blocks;
    - ``loop()``: seconds of the worker's busy loop by phase: ``step`` (the engine's forward steps), ``io_wait``
      (waiting for the Redis round trip in flight: the GPU idles then) and ``host`` (the rest: admissions, building
      and applying round trips).

    A pipeline shard other than 0 passes only ``kv_usage`` (its own pool): shard 0 schedules.
    """

    def __init__(self, kv_usage: Callable[[], float], running: Callable[[], int] | None = None,
                 waiting: Callable[[], int] | None = None, preemptions: Callable[[], int] | None = None,
                 steps: Callable[[], int] | None = None, engine=None,
                 loop: Callable[[], dict[str, float]] | None = None):
        self.kv_usage, self.running, self.waiting = kv_usage, running, waiting
        self.preemptions, self.steps, self.engine, self.loop = preemptions, steps, engine, loop

    def describe(self):  # registering must not call the callables (the worker may not be ready yet)
        return []

    def collect(self):
        yield GaugeMetricFamily("tributary_kv_cache_usage_perc", "KV-cache usage: used blocks / blocks (1 = full)",
                                value=self.kv_usage())
        if self.running is not None:
            yield GaugeMetricFamily("tributary_num_requests_running", "Sequences running on this backbone",
                                    value=self.running())
        if self.waiting is not None:
            yield GaugeMetricFamily("tributary_num_requests_waiting", "Sequences waiting in this backbone's "
                                    "scheduler (read and not started, or preempted)", value=self.waiting())
        if self.preemptions is not None:
            yield CounterMetricFamily("tributary_num_preemptions", "Sequences preempted (their KV blocks taken "
                                      "back)", value=self.preemptions())
        if self.steps is not None:
            yield CounterMetricFamily("tributary_backbone_steps", "Forward steps run", value=self.steps())
        if self.engine is not None:
            decode, prompt = self.engine.positions
            positions = CounterMetricFamily("tributary_backbone_positions", "Positions computed by the forward "
                                            "steps, by kind (decode: one per running stream; prompt: prefill "
                                            "chunks and recomputes)", labels=["kind"])
            positions.add_metric(["decode"], decode)
            positions.add_metric(["prompt"], prompt)
            yield positions
            timed, seconds = self.engine.timed
            yield CounterMetricFamily("tributary_backbone_timed_steps", "Steps whose compute was timed (every step "
                                      "on a CPU; on a GPU those that sampled a token)", value=timed)
            yield CounterMetricFamily("tributary_backbone_step_seconds", "Seconds of the timed steps, from launch to "
                                      "their answers on the host", value=seconds)
            yield GaugeMetricFamily("tributary_backbone_step_budget_tokens", "Positions the next step may compute "
                                    "beside 4 decodes (--max-batched-tokens, or fitted to --max-step-ms)",
                                    value=self.engine.budget.tokens(4))
            pool = self.engine.pool
            yield CounterMetricFamily("tributary_prefix_cache_hit_tokens", "Prompt positions taken from the prefix "
                                      "cache instead of computed (vLLM's prefix_cache_hits, in tokens)",
                                      value=pool.hits * pool.block_size)
            yield GaugeMetricFamily("tributary_prefix_cache_blocks", "KV blocks registered in the prefix cache, "
                                    "held by a sequence or kept free to take", value=pool.cached)
        if self.loop is not None:
            phases = CounterMetricFamily("tributary_backbone_loop_seconds", "Seconds of the worker's busy loop by "
                                         "phase: step (forward steps), io_wait (waiting for the Redis round trip "
                                         "in flight), host (admissions, building and applying round trips)",
                                         labels=["phase"])
            for phase, seconds in self.loop().items():
                phases.add_metric([phase], seconds)
            yield phases


def pool_usage(pool) -> float:
    """Used blocks / blocks of a paged KV pool (backbone/kv.KVPool), 0..1."""
    return (pool.num_blocks - pool.free) / pool.num_blocks if pool.num_blocks else 0.0


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1", what: str = "worker", live=None):
    """Serve ``registry`` at ``http://host:port/metrics`` on a daemon thread, and ``/live``: 200 while ``live()``
    (a worker's :meth:`router.liveness.Heartbeat.live`: its loop keeps coming round), else 503, which a Kubernetes
    liveness probe turns into a restart of a stuck worker (without ``live``: 200 while the process serves). Returns
    the server (its ``server_port`` is the port bound: 0 asks for a free one), or None if the port cannot be bound
    (logged: metrics are not worth stopping a worker for, and an inherited ``TRIBUTARY_METRICS_PORT`` may
    collide)."""
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 -- the base class's name
            pass

    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/live":
            ok = live is None or live()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"live\n" if ok else b"stuck: the worker loop has not come round within its stall timeout\n"]
        return metrics(environ, start_response)

    try:
        server = make_server(host, port, app, Server, handler_class=Quiet)
    except (OSError, OverflowError) as exc:  # OverflowError: a port past 65535 (a base port plus an offset)
        log.error("cannot serve metrics; going on without them", extra={
            "what": what, "host": host, "port": port, "error": f"{type(exc).__name__}: {exc}"})
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving metrics", extra={"what": what, "url": f"http://{host}:{server.server_port}/metrics"})
    return server


def stop(server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
