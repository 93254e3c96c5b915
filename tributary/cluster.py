"""``tributary up``: a local cluster, every tier its own OS process, joined by one Redis server.

Start-up: Redis (embedded unless a URL is given) -> the demo model if no --model -> gateway, image encoder, audio
encoder, backbone -> wait until the gateway reports a live worker in every tier. Shutdown (SIGINT, SIGTERM, or any
child dying): SIGTERM to every child (each drains), SIGKILL after a grace period, then Redis. Children run in their
own sessions (a terminal's Ctrl-C reaches only this supervisor, which then stops them in order) and get SIGTERM if
the supervisor itself dies, so nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cache.embedded import EmbeddedRedis, die_with_parent, free_port

log = logging.getLogger(__name__)

GRACE_S = 35.0  # longer than a worker's drain timeout


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None


@dataclass
class Cluster:
    model: Path
    redis_url: str
    prefix: str = "trib"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    encoder_args: list[str] = field(default_factory=list)  # extra flags for both encoder workers
    shards: int = 1  # backbone pipeline shards
    children: list[Child] = field(default_factory=list)
    modalities: tuple[str, ...] = ("image", "audio")  # one encoder tier each: the model family's (LLaVA: image)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def plan(self) -> list[Child]:
        """One process per tier, each with a share of the cores (torch intra-op threads)."""
        cores = os.cpu_count() or 1
        base = [sys.executable, "-m", "tributary.cli"]
        common = ["--model", str(self.model), "--redis-url", self.redis_url, "--prefix", self.prefix,
                  "--log-level", self.log_level]
        enc_threads = str(max(1, cores // 2))
        children = [
            Child("gateway", base + ["gateway", *common, "--host", self.host, "--port", str(self.port)]),
            *(Child(f"encoder:{m}", base + ["encoder", *common, "--modality", m, "--threads", enc_threads,
                                            *self.encoder_args]) for m in self.modalities),
        ]
        if self.shards == 1:
            return children + [Child("backbone", base + ["backbone", *common, "--threads", str(cores)])]
        url = f"tcp://127.0.0.1:{free_port()}"
        threads = str(max(1, cores // self.shards))
        return children + [
            Child(f"backbone:{i}", base + ["backbone", *common, "--shard", str(i), "--num-shards", str(self.shards),
                                           "--dist-url", url, "--threads", threads])
            for i in range(self.shards)
        ]

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        for child in self.plan():
            child.proc = subprocess.Popen(child.argv, env=env, start_new_session=True, preexec_fn=die_with_parent)
            self.children.append(child)
            log.info("started", extra={"child": child.name, "pid": child.proc.pid})

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_ready(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            if child := self.dead_child():
                log.error("a tier exited during start-up", extra={"child": child.name,
                                                                   "code": child.proc.returncode})
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if json.load(resp).get("status") == "ok":
                        return True
            except OSError:
                pass  # the gateway is still importing or a tier is not live yet
            stop.wait(0.5)
        return False

    def stop(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("killing a tier that did not stop in time", extra={"child": child.name})
                child.proc.kill()
                child.proc.wait()


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
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    model = ensure_model(args)
    modalities = _modalities(model)  # before anything starts: an unsupported checkpoint fails here
    redis = None if args.redis_url else EmbeddedRedis().start()
    encoder_args = ["--runtime", args.encoder_runtime, "--max-batch", str(args.encoder_max_batch),
                    "--max-wait-ms", str(args.encoder_max_wait_ms)]
    cluster = Cluster(model, args.redis_url or redis.url, args.prefix, args.host, args.port, args.log_level,
                      encoder_args, args.shards, modalities=modalities)
    try:
        if args.encoder_runtime == "onnx":  # export once here, not concurrently in both workers
            from encoders.export import ensure_onnx
            from models.spec import ModelSpec

            spec = ModelSpec.from_dir(model)
            for modality in spec.modalities:
                ensure_onnx(spec, modality, progress=lambda line: print(line, flush=True))
        cluster.start()
        if not cluster.wait_ready(args.ready_timeout, stop):
            if not stop.is_set():
                print("tributary: the cluster did not become ready; see the logs above", file=sys.stderr)
            return 1
        print(_banner(cluster, model), flush=True)
        while not stop.is_set():
            if child := cluster.dead_child():
                print(f"tributary: {child.name} exited with code {child.proc.returncode}; stopping the cluster",
                      file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    finally:
        print("tributary: stopping ...", file=sys.stderr, flush=True)
        cluster.stop()
        if redis:
            redis.stop()
        print("tributary: stopped", file=sys.stderr, flush=True)


def _modalities(model: Path) -> tuple[str, ...]:
    """The encoder tiers the checkpoint needs (read from its config.json alone)."""
    from models.spec import read_family

    return read_family(model).modalities


def _banner(cluster: Cluster, model: Path) -> str:
    return f"""
Tributary is up: {cluster.url}  (model '{model.name}' from {model}; Redis {cluster.redis_url})
The demo model has random weights: its answers are random text.

  curl {cluster.url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model.name}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 16}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{cluster.url}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{model.name}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

Ctrl-C stops every process.
"""
