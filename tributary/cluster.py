"""``tributary up``: a local cluster, every tier its own OS process, joined by one Redis server.

Start-up: Redis (embedded unless a URL is given) -> the demo model if no --model -> gateway, one encoder per
modality the model takes, backbone (or its pipeline shards) -> wait until *this* cluster's gateway answers ``/ready``
(Redis up, a live worker in every tier) -> print the banner. The port is checked free before anything starts, and
``/ready`` must echo this cluster's instance id, so another server already on the port is an error, never mistaken
for our readiness. Supervision (restarts, crash loops, output) is tributary/supervisor.py.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cache.client import redact
from cache.embedded import EmbeddedRedis, free_port
from router.lifecycle import STOP_SIGNALS
from router.logs import say
from tributary.supervisor import Child, CrashLoop, Group, Supervisor

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The cluster cannot become ready; the message says why."""


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class CpuBudget:
    """Threads per process of a local cluster so that, together, they do not exceed the machine's cores.

    The backbone's processes weigh twice an encoder's (a decode step waits on every layer; an encoder batch is one
    forward): ``encoder = cores // (2 * backbone procs + encoders)``, at least 1, and the backbone's processes share
    the rest. The gateway runs no torch and gets 1 (its numpy work, Realtime audio features, is small). When the
    compute processes outnumber the cores, each gets 1 and they share: ``oversubscribed``."""

    cores: int
    encoder: int
    backbone: int
    processes: int  # compute processes (encoders + backbone shards)

    @classmethod
    def split(cls, cores: int, encoders: int, backbone_procs: int) -> CpuBudget:
        procs = encoders + backbone_procs
        if cores <= procs:
            return cls(cores, 1, 1, procs)
        encoder = max(1, cores // (2 * backbone_procs + encoders)) if encoders else 0
        backbone = max(1, (cores - encoder * encoders) // backbone_procs)
        return cls(cores, encoder, backbone, procs)

    @property
    def oversubscribed(self) -> bool:
        return self.processes > self.cores

    def describe(self) -> str:
        text = (f"CPU budget ({self.cores} cores): {self.encoder} thread(s) per encoder, {self.backbone} per backbone "
                "process, 1 for the gateway")
        if self.oversubscribed:
            text += f"; {self.processes} compute processes share {self.cores} cores"
        return text


def thread_env(n: int) -> dict[str, str]:
    return {var: str(n) for var in THREAD_VARS}


@dataclass
class Cluster:
    model: Path
    redis_url: str
    prefix: str = "trib"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    encoder_args: list[str] = field(default_factory=list)  # extra flags for every encoder worker
    gateway_args: list[str] = field(default_factory=list)  # extra flags for the gateway
    shards: int = 1  # backbone pipeline shards
    modalities: tuple[str, ...] = ("image", "audio")  # one encoder tier each: the model family's (LLaVA: image)
    replicas: int = 1  # backbone replicas (each ``shards`` processes), all reading one queue
    backbone_args: list[str] = field(default_factory=list)  # extra flags for every backbone shard (--device, --dtype)
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cpu_budget: bool = True  # off: every process takes every core (torch's default), to measure against
    worker_metrics_port: int = 0  # the first worker's --metrics-port (each process the next one); 0: none
    metrics_ports: dict[str, int] = field(default_factory=dict)  # process name -> its metrics port
    waiting_for: list[str] = field(default_factory=lambda: ["gateway"])  # start-up: what /ready lacked last

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def budget(self) -> CpuBudget:
        return CpuBudget.split(os.cpu_count() or 1, len(self.modalities), self.shards * self.replicas)

    def groups(self) -> list[Group]:
        """One group per tier process, the backbone's shards one group; each process with its share of the cores
        (``CpuBudget``: torch intra-op threads, ONNX Runtime's, and the OpenMP / MKL / OpenBLAS pools)."""
        budget = self.budget
        groups = [self._one("gateway", "", self._base() + [
            "gateway", *self._common(), "--host", self.host, "--port", str(self.port),
            "--instance-id", self.instance_id, *self.gateway_args], 1)]
        groups[0].front = True
        groups += [self.replica_group(f"encoder:{m}", 0, budget) for m in self.modalities]
        groups += [self.replica_group("backbone", r, budget) for r in range(self.replicas)]
        return groups

    def tiers(self) -> list[str]:
        """The scalable tiers: one per encoder modality, and the backbone."""
        return [f"encoder:{m}" for m in self.modalities] + ["backbone"]

    def procs_per_replica(self, tier: str) -> int:
        return self.shards if tier == "backbone" else 1

    def replica_group(self, tier: str, index: int, budget: CpuBudget) -> Group:
        """The ``index``-th replica of ``tier`` (0: the one ``tributary up`` starts; more: the autoscaler's), started
        with ``budget``'s share of the cores."""
        name = self.replica_name(tier, index)
        if tier.startswith("encoder:"):
            return self._one(name, tier, self._base() + [
                "encoder", *self._common(), "--modality", tier.split(":", 1)[1], *self.encoder_args],
                budget.encoder, "--threads", "--preprocess-threads")
        if self.shards == 1:
            return self._one(name, tier, self._base() + ["backbone", *self._common(), *self.backbone_args],
                             budget.backbone, "--threads")
        extra, env = self._share(budget.backbone, "--threads")
        return Group(name, self._replica(name, self._base(), self._common(), extra, env), tier=tier)

    def replica_name(self, tier: str, index: int) -> str:
        if tier == "backbone":
            return "backbone" if self.replicas == 1 and index == 0 else f"backbone.{index}"
        return tier if index == 0 else f"{tier}.{index}"

    @staticmethod
    def _base() -> list[str]:
        return [sys.executable, "-m", "tributary.cli"]

    def _common(self) -> list[str]:
        return ["--model", str(self.model), "--prefix", self.prefix, "--log-level", self.log_level]

    def _share(self, n: int, *flags: str, gateway: bool = False) -> tuple[list[str], dict[str, str | None]]:
        # The Redis URL (it may hold a password) reaches the children by environment, never their command lines,
        # which every local user can read (/proc/<pid>/cmdline). API keys given by environment reach the gateway
        # alone: a worker has no use for them.
        env: dict[str, str | None] = {"TRIBUTARY_REDIS_URL": self.redis_url}
        if not gateway:
            env["TRIBUTARY_API_KEYS"] = None
        if not self.cpu_budget:
            return [], env
        return [flag for f in flags for flag in (f, str(n))], {**env, **thread_env(n)}

    def _one(self, name: str, tier: str, argv: list[str], n: int, *flags: str) -> Group:
        extra, child_env = self._share(n, *flags, gateway=not tier)
        if tier:
            extra = extra + self._metrics_flags(name)
        return Group(name, lambda: [Child(name, argv + extra, child_env)], tier=tier)

    def _replica(self, name: str, base: list[str], common: list[str], extra: list[str], env: dict[str, str]):
        def replica() -> list[Child]:
            url = f"tcp://127.0.0.1:{free_port()}"  # a fresh rendezvous for every (re)start
            return [Child(f"{name}:{i}", base + ["backbone", *common, "--shard", str(i), "--num-shards",
                                                 str(self.shards), "--dist-url", url, *extra,
                                                 *self.backbone_args, *self._metrics_flags(f"{name}:{i}")], env)
                    for i in range(self.shards)]

        return replica

    def _metrics_flags(self, name: str) -> list[str]:
        """``--metrics-port`` for a worker process: ``worker_metrics_port`` + k, one port per process name, kept for
        the name (a replica the autoscaler adds again gets its old port); none when the base is 0."""
        if not self.worker_metrics_port:
            return ["--metrics-port", "0"]  # a TRIBUTARY_METRICS_PORT in up's environment is not for every child
        port = self.metrics_ports.get(name, self.worker_metrics_port + len(self.metrics_ports))
        if port > 65535:  # past the last port: this process serves none (the banner lists only ports handed out)
            log.warning("no worker metrics port left for a process", extra={"child": name, "base":
                                                                              self.worker_metrics_port})
            return ["--metrics-port", "0"]
        self.metrics_ports[name] = port
        return ["--metrics-port", str(port)]

    def check_port(self) -> None:
        """NotReady if the gateway's port, or a worker's metrics port (``--worker-metrics-port``), is taken: one line
        before anything starts (a worker that could not bind its metrics port would run without, and the banner
        would list it)."""
        if problem := listen_problem(self.host, self.port):
            raise NotReady(problem)
        self.groups()  # hands out the workers' metrics ports
        for name, port in self.metrics_ports.items():
            if problem := listen_problem("127.0.0.1", port, flag="--worker-metrics-port"):
                raise NotReady(f"{problem} for {name}'s metrics")

    def ready(self) -> bool:
        """Whether our own gateway answers /ready with 200. NotReady if something else answers on the port.
        ``self.waiting_for`` says what it lacks: the tiers /ready names as missing, or the gateway itself."""
        self.waiting_for = ["gateway"]
        try:
            with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as resp:
                body, ok = json.load(resp), True
        except urllib.error.HTTPError as exc:  # 503 while a tier is not live yet
            try:
                body, ok = json.load(exc), False
            except ValueError:
                body, ok = {}, False
        except (OSError, ValueError):
            return False  # not listening yet (importing)
        if body.get("instance") != self.instance_id:
            raise NotReady(f"{self.url} is answered by another server, not this cluster's gateway (port taken?)")
        self.waiting_for = list(body.get("missing") or ([] if ok else ["redis"]))
        return ok


PROGRESS_S = 5.0  # start-up: how often it says what it still waits for


def count_restart(cluster: Cluster, group: Group) -> None:
    """One more restart of ``group``'s tier, in the tier's stats hash (``restarts``): exported with the other tier
    stats by the gateway's /metrics and shown by the playground. Best effort: Redis may be what failed."""
    from cache.client import connect
    from cache.keys import Keys

    try:
        connect(cluster.redis_url, retries=0, socket_timeout=2).hincrby(
            Keys(cluster.prefix).stats(group.tier or "gateway"), "restarts", 1)
    except Exception as exc:  # noqa: BLE001 -- a count is not worth failing a restart for
        log.warning("restart not counted", extra={"group": group.name, "error": type(exc).__name__})


def wait_ready(cluster: Cluster, sup: Supervisor, timeout: float, stop: threading.Event) -> None:
    """Returns once the cluster is ready; NotReady (with the failing process's last lines) otherwise. Says every
    ``PROGRESS_S`` what it still waits for (each process loads PyTorch and its part of the model first)."""
    start = time.monotonic()
    deadline, said = start + timeout, start
    while not stop.is_set():
        if child := sup.dead_child():
            raise NotReady(f"{child.name} exited with code {child.exited} during start-up; its last lines:\n"
                           + "\n".join("    " + line for line in child.last_lines().splitlines()))
        if cluster.ready():
            return
        now = time.monotonic()
        if now > deadline:
            raise NotReady(f"the cluster was not ready after {timeout:g} s; see the logs above")
        if now - said >= PROGRESS_S:
            said = now
            say(f"starting ({now - start:.0f} s): waiting for {', '.join(cluster.waiting_for) or 'the gateway'} "
                f"to load (gives up after {timeout:g} s)")
        stop.wait(0.3)


def ensure_model(args) -> Path:
    if args.model:
        return Path(args.model)
    from tributary.cli import default_demo_dir

    path = default_demo_dir(args.demo_size)
    if not (path / "model.safetensors").exists():
        from models.demo import write_demo_model

        print(f"creating the {args.demo_size} demo model (random weights) in {path} ...", flush=True)
        write_demo_model(path, args.demo_size)
    return path


def run_cluster(args) -> int:
    stop = threading.Event()
    running: list[Supervisor] = []
    # A second stop signal: every process killed, requests in flight cut. It, or the first one before the cluster
    # came up, is the exit status as a shell gives it for a process a signal ended: 128 + its number (Ctrl-C 130,
    # SIGTERM 143).
    forced: list[int] = []
    signals: list[int] = []
    came_up = False

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would raise (EIO) mid-stop
            _detach_from_terminal()
        if stop.is_set() and running:  # a second Ctrl-C: no more waiting for the graceful stop
            say("stopping now (killing every process)", logging.WARNING)
            forced.append(signum)
            running[0].kill()
        stop.set()

    for sig in STOP_SIGNALS:  # a closed terminal (SIGHUP) stops the cluster as Ctrl-C does
        signal.signal(sig, on_signal)
    from gateway.config import parse_mm_limits

    try:
        parse_mm_limits(args.limit_mm_per_prompt)  # a bad flag is an error here, not a gateway that will not start
    except ValueError as exc:
        print(f"tributary: --limit-mm-per-prompt: {exc}", file=sys.stderr)
        return 2
    # The devices' spelling is checked by their flags' type (tributary/cli._device); each worker checks the device
    # exists when it starts.
    if args.backbone_dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        print(f"tributary: --backbone-dtype must be auto, float32, bfloat16 or float16 (got {args.backbone_dtype!r})",
              file=sys.stderr)
        return 2
    model = ensure_model(args)
    modalities = _modalities(model)  # before anything starts: an unsupported checkpoint fails here
    layers = _num_layers(model)
    if layers is not None and args.shards > layers:  # each shard failed at start, and the cluster stopped after
        print(f"tributary: --shards {args.shards}: the model has {layers} layers, so a replica has at most {layers} "
              "shards", file=sys.stderr)
        return 2
    limits = ["--max-audio-seconds", str(args.max_audio_seconds)]
    encoder_dtype = args.encoder_dtype  # resolved here: the gateway must be told what the encoders compute in
    if encoder_dtype == "auto":
        gpu = args.encoder_device.startswith("cuda") and args.encoder_runtime == "torch"
        encoder_dtype = "bfloat16" if gpu else "float32"
    if args.encoder_runtime == "onnx" and encoder_dtype != "float32":  # each encoder refused it at its start
        print(f"tributary: --encoder-runtime onnx computes in float32, not {encoder_dtype}: leave --encoder-dtype "
              "out (or float32) and give --encoder-wire-dtype bfloat16 for a bf16 cache, or use --encoder-runtime "
              "torch", file=sys.stderr)
        return 2
    wire_dtype = encoder_dtype if args.encoder_wire_dtype == "auto" else args.encoder_wire_dtype
    encoder_args = ["--runtime", args.encoder_runtime, "--device", args.encoder_device, "--dtype", encoder_dtype,
                    "--wire-dtype", wire_dtype,
                    "--max-batch", str(args.encoder_max_batch),
                    "--max-wait-ms", str(args.encoder_max_wait_ms), *limits]
    admission = ["--migration-limit", str(args.migration_limit), "--max-inflight", str(args.max_inflight),
                 "--max-backlog", str(args.max_backlog), "--max-queue-wait", str(args.max_queue_wait),
                 "--max-connections", str(args.max_connections),
                 "--body-timeout", str(args.body_timeout), "--header-timeout", str(args.header_timeout),
                 "--encode-timeout", str(args.encode_timeout), "--first-token-timeout", str(args.first_token_timeout),
                 "--token-timeout", str(args.token_timeout), "--no-worker-timeout", str(args.no_worker_timeout),
                 "--send-timeout", str(args.send_timeout)]
    for flag in ("api_key_file", "shared_cache", "allowed_hosts", "allowed_origins", "allowed_media_domains",
                 "rate_limit_rpm", "rate_limit_tpm"):  # keys go by environment
        if getattr(args, flag):
            admission += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.no_media_cache:
        admission.append("--no-media-cache")
    if args.served_name:
        admission += ["--served-name", args.served_name]
    cluster = Cluster(model, args.redis_url or "", args.prefix, args.host, args.port, args.log_level,
                      encoder_args, ["--limit-mm-per-prompt", args.limit_mm_per_prompt, "--encoder-dtype",
                                     encoder_dtype, "--encoder-wire-dtype", wire_dtype, *limits, *admission],
                      args.shards, modalities, replicas=args.backbone_replicas,
                      backbone_args=["--device", args.backbone_device, "--dtype", args.backbone_dtype,
                                     *(["--max-batched-tokens", str(args.max_batched_tokens)]
                                       if args.max_batched_tokens is not None else []),
                                     *(["--max-step-ms", str(args.max_step_ms)]
                                       if args.max_step_ms is not None else []),
                                     *(["--max-running", str(args.max_running)] if args.max_running else []),
                                     *(["--no-prefix-cache"] if args.no_prefix_cache else []),
                                     *(["--kv-cache-gb", str(args.kv_cache_gb)] if args.kv_cache_gb else [])],
                      cpu_budget=args.cpu_budget == "auto", worker_metrics_port=args.worker_metrics_port)
    policies = {}
    if args.autoscale:
        from tributary.autoscaler import policies_from_args

        try:
            policies = policies_from_args(args, cluster)
        except ValueError as exc:
            print(f"tributary: {exc}", file=sys.stderr)
            return 2
    if problem := children_problem(cluster, args):  # what a worker would refuse at its start: before any starts
        print(f"tributary up: error: {problem}", file=sys.stderr)
        return 2
    try:
        cluster.check_port()
        if args.redis_url:
            check_redis(args.redis_url)  # unreachable, or a wrong password: one line now, not workers crashing
    except NotReady as exc:
        print(f"tributary: {exc}", file=sys.stderr)
        return 1
    redis = None if args.redis_url else EmbeddedRedis(password=secrets.token_hex(16)).start()
    cluster.redis_url = args.redis_url or redis.url
    sup = Supervisor(cluster.groups(), args.max_restarts, args.restart_window,
                     on_restart=lambda group: count_restart(cluster, group))
    running.append(sup)
    code = 0
    scaler = probe = None
    try:
        if args.encoder_runtime == "onnx":  # export once here, not concurrently in both workers
            from encoders.export import ensure_onnx
            from models.spec import ModelSpec

            spec = ModelSpec.from_dir(model)
            for modality in spec.modalities:
                ensure_onnx(spec, modality, progress=lambda line: print(line, flush=True))
        sup.start()
        wait_ready(cluster, sup, args.ready_timeout, stop)
        came_up = not stop.is_set()
        if came_up:
            keyed = bool(args.api_key_file or os.environ.get("TRIBUTARY_API_KEYS")
                         or os.environ.get("TRIBUTARY_API_KEY_FILE"))
            print(_banner(cluster, model, args.served_name, keyed), flush=True)
        if policies and not stop.is_set():
            from tributary.autoscaler import LocalAutoscaler

            scaler = LocalAutoscaler(cluster, sup, policies, args.autoscale_poll, args.autoscale_max_procs,
                                     args.autoscale_trace, args.autoscale_idle_cores)
            say("autoscaling " + ", ".join(f"{t} {p.min_replicas}..{p.max_replicas}" for t, p in policies.items()))
        watchdog = None
        if args.hang_timeout > 0:
            from tributary.watchdog import GatewayProbe, Watchdog

            watchdog = Watchdog(cluster.redis_url, cluster.prefix, cluster.tiers(), args.hang_timeout,
                                load_s=args.ready_timeout)
            probe = GatewayProbe(cluster.url, cluster.instance_id, args.hang_timeout, args.ready_timeout)
        redis_restarts: list[float] = []
        while not stop.is_set():
            if watchdog:
                watchdog.check(sup.groups)  # a stuck worker is killed here and restarted by tend()
                probe.check(sup.groups[0])  # the gateway (groups() puts it first), asked over HTTP
            if redis and redis.proc.poll() is not None:
                redis_restarts = _restart_redis(redis, redis_restarts, args.max_restarts, args.restart_window)
            sup.tend()
            if scaler:
                scaler.tick()
            stop.wait(0.3)
        if not came_up:
            code = 128 + (signals[0] if signals else signal.SIGINT)  # interrupted before the cluster came up
    except (NotReady, CrashLoop) as exc:
        say(str(exc), logging.ERROR)
        code = 1
    finally:
        say("stopping ...")
        if probe:
            probe.close()
        if scaler:
            scaler.close()
        sup.stop()
        if redis:
            redis.stop()
        say("stopped")
    return 128 + forced[0] if forced else code


def children_problem(cluster: Cluster, args) -> str | None:
    """What one of the cluster's processes would refuse as it starts, found before any starts, in one line: a device
    this machine lacks, a flag or a ``TRIBUTARY_*`` variable its command's parser refuses (an outside tester's
    ``--backbone-device cuda:3`` and ``TRIBUTARY_DRAIN_TIMEOUT=-1`` started Redis and every worker, then stopped
    with exit 1 and a worker's usage text in the log)."""
    from router.lifecycle import device_problem
    from tributary.cli import parse_problem

    if problem := device_problem(args.backbone_device, "--backbone-device"):
        return problem
    if args.encoder_runtime == "torch" and (problem := device_problem(args.encoder_device, "--encoder-device")):
        return problem  # (ONNX Runtime falls back to its CPU provider)
    for group in cluster.groups():
        for child in group.make():
            # The embedded Redis's URL is known once it runs: any URL stands for it here.
            env = {**child.env, "TRIBUTARY_REDIS_URL": child.env.get("TRIBUTARY_REDIS_URL") or "redis://localhost"}
            if problem := parse_problem(child.argv[3:], env, child.argv[3]):
                return f"{group.tier or child.name}: {problem}"
    return None


def _restart_redis(redis: EmbeddedRedis, restarts: list[float], max_restarts: int, window_s: float) -> list[float]:
    """The embedded Redis died (killed, out of memory): started again, empty, on its port and with its password (the
    tiers reconnect and recover as from any Redis restart). CrashLoop past ``max_restarts`` within ``window_s``."""
    from cache.embedded import EmbeddedRedisError

    now = time.monotonic()
    restarts = [t for t in restarts if now - t < window_s] + [now]
    code = redis.proc.returncode
    err = redis.proc.stderr.read().decode(errors="replace").strip()[-500:] if redis.proc.stderr else ""
    say(f"the embedded Redis exited with code {code}; restarting it (empty) on port {redis.port}", logging.ERROR,
        code=code, port=redis.port, stderr=err)
    if len(restarts) > max_restarts:
        raise CrashLoop(f"the embedded Redis exited {len(restarts)} times within {window_s:g} s")
    redis.stop()
    try:
        redis.start(port=redis.port)
    except EmbeddedRedisError as exc:
        raise CrashLoop(f"the embedded Redis could not be restarted: {exc}") from None
    return restarts


def listen_problem(host: str, port: int, flag: str = "--port") -> str | None:
    """Why a server could not listen on ``host:port`` (as uvicorn binds it), or None: checked before a gateway loads
    anything, so that a port already taken is one line at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc} (--host)"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server is using it? pass {flag})"
    return None


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """NotReady, in words, unless the Redis at ``url`` answers a PING (with the credentials the URL carries)."""
    from cache.client import describe, ping_error

    if (exc := ping_error(url, timeout_s)) is not None:  # anything that stops a PING stops every tier
        raise NotReady(f"Redis at {redact(url)}: {describe(exc)} ({type(exc).__name__}: {exc}); check --redis-url "
                       "(or TRIBUTARY_REDIS_URL)")


def _detach_from_terminal() -> None:
    """Point stdout and stderr where they are a terminal (and so every later print, and the children's output this
    process relays) at /dev/null: after a hang-up, writes to the terminal fail, and the graceful stop must not. A
    file or a pipe keeps them (an outside tester's log file lost the stop's lines); a pipe's reader gone makes
    writes fail, which the output relay drops."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def _modalities(model: Path) -> tuple[str, ...]:
    """The encoder tiers the checkpoint needs (read from its config.json alone); ModelError, before anything
    starts, when it cannot serve chats (no tokenizer or chat template: the gateway's start would fail later)."""
    from models.family import check_prompt_files
    from models.spec import read_family

    check_prompt_files(model)
    return read_family(model).modalities


def _num_layers(model: Path) -> int | None:
    """The language model's layers (config.json alone), None if it does not say (the backbone's load says then)."""
    from models.spec import read_text_config

    try:
        return int(read_text_config(model)["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None


def _metrics_line(cluster: Cluster) -> str:
    ports = ", ".join(f"{name} :{port}" for name, port in cluster.metrics_ports.items())
    return f"Metrics: {cluster.url}/metrics" + (f"; workers at 127.0.0.1 {ports}" if ports else "")


DEMO_NOTE = ("The demo model has random weights: its answers are random text, often with U+FFFD (its tokens are "
             "random bytes).\n")


def _is_demo(model: Path) -> bool:
    from models.spec import TRIMODAL, read_family

    try:
        return read_family(model) is TRIMODAL
    except Exception:  # the banner says nothing rather than fail a start that succeeded
        return False


def _banner(cluster: Cluster, model: Path, served_name: str | None = None, keyed: bool = False) -> str:
    """What ``tributary up`` prints once ready: where it is, and two first requests that work in the environment it
    runs in (its own interpreter, which has the openai SDK: scripts/setup.sh installs it with every extra). With API
    keys, the requests read one from ``$TRIBUTARY_KEY`` (the banner never prints a key)."""
    budget = cluster.budget.describe() if cluster.cpu_budget else "CPU budget: off (every process on every core)"
    name = served_name or model.name
    chat = f"c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Hi'}}])"
    header = " -H \"authorization: Bearer $TRIBUTARY_KEY\"" if keyed else ""
    key = "os.environ['TRIBUTARY_KEY']" if keyed else "'none'"
    keys_note = "API keys are on: export TRIBUTARY_KEY=<one of your keys> for the requests below.\n" if keyed else ""
    return f"""
Tributary is up: {cluster.url}  (model '{name}' from {model}; Redis {redact(cluster.redis_url)})
{budget}
{_metrics_line(cluster)}
Logs: the lines above, one per event, each naming its process's tier (--log-format json|text).
{DEMO_NOTE if _is_demo(model) else ""}{keys_note}
  curl {cluster.url}/v1/chat/completions -H 'content-type: application/json'{header} \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 16}}'

  {shlex.quote(sys.executable)} -c "import os; from openai import OpenAI; \\
c = OpenAI(base_url='{cluster.url}/v1', api_key={key}); print({chat}.choices[0].message.content)"

Ctrl-C stops every process.
"""
