"""Redis connections with one retry and timeout policy for every tier.

Workers (encoders, backbone) run a synchronous loop and use :func:`connect`; the gateway runs on asyncio and uses
:func:`connect_async`. Both retry a call that could not reach the server (a connection refused or reset: a
restarting server, a stale pooled connection) a few times with exponential backoff, but never one that timed out:
the server may have run it, and running XADD or XREADGROUP twice queues a plan twice or delivers entries nobody
hears of (callers handle that: workers re-read their own pending entries, cache/streams.py). Every call has a
socket timeout: a paused or partitioned server makes a call fail after ``socket_timeout`` (plus the retries)
instead of hanging until TCP gives up. Blocking reads (XREAD/XREADGROUP ``BLOCK``) must block for less than the
socket timeout. A call that times out or is cancelled closes its connection (redis-py disconnects on both), so its
late reply can never be read by the next command (the lesson of CVE-2023-28858; tests/integration/test_recovery.py).

**Redis Cluster.** The URL may name any node of a cluster: :func:`cluster_mode` asks the server (``INFO cluster``),
once per process and URL, and a cluster gets redis-py's cluster client, which follows the slot map (MOVED, ASK,
failovers) by itself. A sync client's pipeline keeps a node that does not answer to that node's commands (its round
trip waits a few socket timeouts at most) and sends it nothing more until it answers a probe
(:func:`_isolating_cluster`): one shard away never holds the work of the others. ``TRIBUTARY_REDIS_CLUSTER=yes|no``
skips the question; a server that cannot be reached when asked is taken for a single server (a warning says so), so
a cluster whose nodes may start after Tributary's processes should set it. Tributary's keys are hash-tagged so that
no script or ordered pipeline spans two slots (cache/keys.py).

**Large values.** redis-py packs commands with hiredis when it is installed: fastest for the small commands that are
most of the traffic, but it copies a large value twice (to bytes, then into one buffer) at about 1 GB/s, which
capped an encoder worker publishing 4.7 MB tensors. The workers' connections pack a command holding a large value
(or a memoryview) the Python way instead, which sends the value as it is (:class:`LargeValuePacker`: a batch of
tensors published 2.8x faster, bench/publish.py). The asyncio client always packs the Python way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from functools import partial

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

RETRY_ERRORS = [RedisConnectionError]  # not RedisTimeoutError: see above
CLUSTER_ENV = "TRIBUTARY_REDIS_CLUSTER"  # auto (the default): ask the server; yes; no

log = logging.getLogger(__name__)


ASYNC_MAX_CONNECTIONS = 256  # an asyncio client's pool (the gateway sizes its own to its --max-inflight)
SOCKET_TIMEOUT_S = 5.0  # any one call (longer than every BLOCK we use: at most 1 s)
CONNECT_TIMEOUT_S = 2.0
REDIS_CODE = os.path.dirname(redis.__file__) + os.sep  # where redis-py's own frames come from

# How long an asyncio cluster client's commands wait for a refresh of its slot map (see _refreshing_cluster).
REFRESH_WAIT_S = 1.0


def redact(url: str) -> str:
    """A Redis URL fit for a log line or a banner: its password (and user) replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe(exc: BaseException) -> str:
    """What went wrong talking to Redis, in words fit for a client or a probe: no host, port or server text (those
    go to the log)."""
    from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if refused_credentials(exc):
        return "authentication failed"
    if not_redis(exc):
        return "not a Redis server (it answered in another protocol: does the URL name the right port?)"
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, RedisConnectionError | ConnectionError | OSError):
        return "cannot connect"
    if refused_for_memory(exc):
        return "out of memory: it refuses writes (maxmemory)"
    if isinstance(exc, ReadOnlyError):
        return "read-only (a replica): it refuses writes"
    if isinstance(exc, BusyLoadingError):
        return "loading its data"
    if isinstance(exc, ResponseError):
        return "the server refused a command"
    return "error"


def describe_startup_error(exc: BaseException) -> str:
    """An error that stopped a command before it could serve, in one line for the operator: the file it concerns
    where the exception names one, a Redis failure as ``describe`` words it."""
    from redis.exceptions import RedisError

    if isinstance(exc, RedisError):
        return f"Redis: {describe(exc)} ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc) or type(exc).__name__
    return text if type(exc) in (ValueError, OSError) else f"{text} ({type(exc).__name__})"


def refused_credentials(exc: BaseException) -> bool:
    """Redis refusing the client's password or user (it never clears: a configuration to fix)."""
    from redis.exceptions import AuthenticationError

    return isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc)


def not_redis(exc: BaseException) -> bool:
    """The server answered in another protocol (an HTTP server on the port the URL names, say): waiting will not
    mend it, as a refused password will not."""
    from redis.exceptions import InvalidResponse

    return isinstance(exc, InvalidResponse)


def ping_error(url: str, timeout_s: float = 5.0) -> Exception | None:
    """What stops a PING to the Redis at ``url`` (with the credentials it carries), or None: one try, no retries (a
    cluster client reads its slot map on connecting, so that is inside the try too)."""
    client = None
    try:
        client = connect(url, retries=0, socket_timeout=timeout_s)
        client.ping()
        return None
    except Exception as exc:  # noqa: BLE001 -- whatever stops it, the caller words it (``describe``)
        return exc
    finally:
        if client is not None:
            client.close()


def refused_for_memory(exc: BaseException) -> bool:
    """Redis at ``maxmemory`` refusing a write: as a command's error (OutOfMemoryError) or a script's (a
    ResponseError naming it)."""
    from redis.exceptions import OutOfMemoryError

    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


def lost_node(result) -> bool:
    """A pipeline reply (``raise_on_error=False``) that says its node was not reached or did not answer: on a Redis
    Cluster one node may fail while the others answer, so such an error arrives as one reply among data."""
    from redis.exceptions import ClusterDownError, TryAgainError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(result, (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError))


def key_error(result) -> bool:
    """A pipeline reply that is its own key's error, not Redis's: the key holds another type than the command takes
    (WRONGTYPE: a message naming a key another version or writer made), or an ACL refuses it. Such a reply says
    nothing about the other commands or Redis's health, so the message that named the key fails alone; taken for an
    outage, the same message came back after each retry and held its worker's queue for good (an outside
    auditor's). A node away, a failover's read-only replica or a busy server are not: those are retried."""
    from redis.exceptions import ReadOnlyError, ResponseError

    return isinstance(result, ResponseError) and not isinstance(result, ReadOnlyError) and not lost_node(result) and (
        "BUSY" not in str(result)[:5])


def no_such_key(result) -> bool:
    """XINFO's error for a stream that does not exist (yet): a pipeline reply, not a failure."""
    from redis.exceptions import ResponseError

    return isinstance(result, ResponseError) and "no such key" in str(result).lower()


def failed_reply(replies: list) -> Exception | None:
    """The first error among a pipeline's replies (``raise_on_error=False``) but XINFO's :func:`no_such_key`: on a
    Redis Cluster, one node's failure arrives as one reply among the others' data."""
    return next((r for r in replies if isinstance(r, Exception) and not no_such_key(r)), None)


def eviction_hazard(policy: str) -> tuple[int, str] | None:
    """What a Redis ``maxmemory-policy`` risks for Tributary, as ``(logging level, words for the operator)``; None
    for the policies it is built for: ``volatile-lru``/``volatile-lfu`` (only keys with a TTL, cached tensors and
    media first, are evicted) and ``noeviction`` (writes refused at ``maxmemory``: a 503 ``cache_full``)."""
    import logging

    if policy.startswith("allkeys-"):
        return logging.ERROR, (f"Redis may evict any key at maxmemory (maxmemory-policy {policy}): job queues, "
                               "their consumer groups and results can vanish, losing requests already accepted; "
                               "set maxmemory-policy volatile-lru (or noeviction)")
    if policy in ("volatile-ttl", "volatile-random"):
        first = "the keys nearest their expiry first" if policy == "volatile-ttl" else "keys with a TTL at random"
        return logging.WARNING, (f"Redis evicts {first} at maxmemory (maxmemory-policy {policy}): short-lived "
                                 "liveness leases and reply streams go as soon as cached tensors, and a gateway "
                                 "whose lease is evicted re-queues its work; set maxmemory-policy volatile-lru")
    return None


PASSWORD_FILE_ENV = "TRIBUTARY_REDIS_PASSWORD_FILE"


def with_password_file(url: str) -> str:
    """``url`` with the password read from the file ``$TRIBUTARY_REDIS_PASSWORD_FILE`` names (a Docker or Kubernetes
    secret mounted as a file), unless the URL carries one already. Read at every connect, so a rotated secret is
    picked up by the next connection."""
    import os
    from urllib.parse import quote, urlsplit, urlunsplit

    path = os.environ.get(PASSWORD_FILE_ENV)
    parts = urlsplit(url)
    if not path or parts.password is not None:
        return url
    try:
        password = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise ValueError(f"{PASSWORD_FILE_ENV}: cannot read the password file ({exc.strerror})") from None
    if not password:
        return url
    user = quote(parts.username, safe="") if parts.username else ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


LARGE_VALUE = 64 * 1024  # bytes: a command with an argument this long is packed without copying it


class LargeValuePacker:
    """Packs a command with hiredis, unless one of its arguments is a memoryview or a value of ``LARGE_VALUE``
    bytes or more: then redis-py's Python packer, which hands such a value to the socket as it is."""

    def __init__(self, buffer_cutoff: int, encode):
        from redis.connection import HIREDIS_AVAILABLE, HiredisRespSerializer, PythonRespSerializer

        self.small = HiredisRespSerializer() if HIREDIS_AVAILABLE else None
        self.large = PythonRespSerializer(buffer_cutoff, encode)

    def pack(self, *args):
        if self.small is None or any(isinstance(a, memoryview) or (isinstance(a, bytes | bytearray)
                                                                   and len(a) >= LARGE_VALUE) for a in args):
            return self.large.pack(*args)
        return self.small.pack(*args)


_packing: dict[type, type] = {}


def packing_class(base: type) -> type:
    """``base`` (redis-py's Connection, SSLConnection or UnixDomainSocketConnection) with :class:`LargeValuePacker`."""
    if base not in _packing:
        def construct(self, packer):
            return packer or LargeValuePacker(self._buffer_cutoff, self.encoder.encode)

        _packing[base] = type(f"Packing{base.__name__}", (base,), {"_construct_command_packer": construct})
    return _packing[base]


def _connection_class(url: str) -> type:
    """The connection class redis-py would choose for ``url`` (TLS, a Unix socket or TCP), with the packer."""
    from redis.connection import Connection, parse_url

    return packing_class(parse_url(url).get("connection_class", Connection))


def _options(socket_timeout: float) -> dict:
    return {
        "retry_on_error": RETRY_ERRORS,
        "retry_on_timeout": False,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, socket_timeout),
        "decode_responses": False,
    }


_modes: dict[str, bool] = {}


def command_keys(args: tuple) -> list | None:
    """The keys of the commands Tributary sends whose keys have no fixed place (redis-py's "movablekeys"): XREAD /
    XREADGROUP (the first half of what follows STREAMS) and EVAL / EVALSHA (``numkeys`` of them after it); None for
    another command (whose arguments may be any bytes: only the name is looked at)."""
    def word(a) -> str:
        return (a.decode("latin-1") if isinstance(a, (bytes, bytearray)) else str(a)).upper()

    if not args:
        return None
    name = word(args[0])
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        if len(args) < 3:
            return None
        try:
            numkeys = int(args[2])
        except ValueError:
            return None
        return list(args[3 : 3 + numkeys])
    if name not in ("XREAD", "XREADGROUP"):
        return None
    at = next((i for i, a in enumerate(args) if word(a) == "STREAMS"), None)
    if at is None:
        return None
    rest = args[at + 1 :]
    return list(rest[: len(rest) // 2])


class _StreamKeys:
    """redis-py's cluster command parser, except that the keys of XREAD/XREADGROUP and of scripts (EVAL, which its
    pipelines route this way) are read from the command itself (:func:`command_keys`). redis-py asks a server for
    them (COMMAND GETKEYS: a round trip before every such command), always its default node, and outside the code
    that refreshes the slot map on a connection error: once that node dies, every such command fails for good
    (measured here: a worker never recovered from a failover; an outside tester's: a backbone whose default node was
    the dead primary never made another round trip). Wraps the sync and the asyncio parser."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_keys(self, *args):
        keys = command_keys(args[1:])  # sync: (connection, *command)
        return keys if keys is not None else self._inner.get_keys(*args)


class _AsyncStreamKeys(_StreamKeys):
    def __init__(self, inner, client):
        super().__init__(inner)
        self._client = client

    async def initialize(self, node=None):
        """The command table, read once: from the default node, else from any other node that answers. redis-py
        read it from the default node alone, and again on every slot-map refresh (after every node failure): a
        primary lost with no replica stays listed and may be that node, and then a new client could not start
        and a running one, after one failed command, failed every command, on every shard (an outside tester's
        chaos run: the gateway refused every request while one shard it did not use was lost)."""
        if getattr(self._inner, "commands", None):
            if node is not None:
                self._inner.node = node
            return
        try:
            await self._inner.initialize(node)
        except redis.RedisError:
            for other in self._client.get_nodes():
                if other is node:
                    continue
                try:
                    await self._inner.initialize(other)
                    return
                except redis.RedisError:
                    continue
            raise

    async def get_keys(self, *args):
        keys = command_keys(args)
        return keys if keys is not None else await self._inner.get_keys(*args)


_refreshing: type | None = None


def _refreshing_cluster() -> type:
    """redis-py's asyncio cluster client, except that a refresh of its slot map (after a node failed a command) holds
    its other commands ``REFRESH_WAIT_S`` at most, not for the whole refresh. redis-py refreshes under a lock every
    command waits on, asking the nodes it knows one by one: one that does not answer (paused, partitioned: a shard
    away, its replica too) costs that refresh a socket timeout (10 s in the gateway), and every command on every
    shard waited for it (an outside tester's chaos run: the gateway queued nothing for 10 s while a shard it did
    not need was away). The refresh goes on in its own task; commands wait for it until ``REFRESH_WAIT_S`` after
    it started (a failover's fresh map usually comes in milliseconds), then go on with the map they have."""
    global _refreshing
    if _refreshing is not None:
        return _refreshing
    from redis.asyncio.cluster import RedisCluster
    from redis.cluster import PRIMARY

    class RefreshingCluster(RedisCluster):
        _refresh: asyncio.Future | None = None
        _refresh_since = 0.0  # the event loop's time the refresh started: commands wait until REFRESH_WAIT_S after

        async def initialize(self, additional_startup_nodes_info=None, last_failed_node_name=None):
            if not self._initialize or not self.nodes_manager.slots_cache:  # up to date, or the first map
                return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
            now = asyncio.get_running_loop().time()
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._refresh_map(additional_startup_nodes_info,
                                                                        last_failed_node_name))
                self._refresh_since = now
            try:
                await asyncio.wait_for(asyncio.shield(self._refresh), self._refresh_since + REFRESH_WAIT_S - now)
            except asyncio.TimeoutError:
                pass  # on with the map it has (a command to a node that does not answer fails on its own)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # this command was cancelled
                # else the refresh was (the event loop closing): on with the map it has
            return self

        async def _refresh_map(self, additional_startup_nodes_info, last_failed_node_name) -> None:
            try:
                await super().initialize(additional_startup_nodes_info, last_failed_node_name)
            except (redis.RedisError, RedisClusterException) as exc:  # no node answered: the next failure asks again
                log.warning("could not refresh the redis cluster's slot map", extra={"error": describe(exc)})

        async def execute_command(self, *args, **kwargs):
            """redis-py's, except that a client with no slot map yet reads it before choosing a node. redis-py chose
            first, and a command choosing without a map went to a random node: a fresh client's first concurrent
            commands drew MOVED replies, and every fifth MOVED closed the client (redis-py's ``reinitialize_steps``),
            cutting the connections of the commands in flight on every node (measured: 15 concurrent SETs on a fresh
            client failed in 15 tries of 20, with AttributeErrors and "Connection closed by server")."""
            if not self.nodes_manager.slots_cache:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)

        def get_default_node(self):
            """redis-py's, except that it is never None once a slot map is known. redis-py's ``aclose`` (which its
            pipelines call after a failed node) drops the default node, and only a finished refresh sets it again;
            meanwhile redis-py sent every command to a random node instead of its key's (a node that answers says
            MOVED). With a shard away and the refresh stuck on it, a command in three waited out the away node's
            socket timeouts (an outside tester's chaos run: a gateway's reply reader, its stream on a healthy shard,
            heard nothing for 10-21 s at a time). The first primary known stands in: redis-py lists last the nodes
            that failed."""
            node = self.nodes_manager.default_node
            if node is None and self.nodes_manager.slots_cache:
                primaries = self.nodes_manager.get_nodes_by_server_type(PRIMARY)
                if primaries:
                    node = self.nodes_manager.default_node = primaries[0]
            return node

        async def aclose(self) -> None:
            """Closes the client, except when redis-py itself calls it to have its slot map read again (its
            pipelines after a failed node, its commands after a cluster-down error or every few MOVED replies):
            then it only asks for that refresh. redis-py's close cut every connection of every node, the commands in
            flight on them included: the commands of other requests, on shards that were fine, failed (an outside
            tester's chaos run: a 500 from uvloop's "unable to perform operation on <TCPTransport closed=True>"),
            or were sent again. The refresh itself has each connection reconnect once its command is done.

            Nor does it end a refresh in flight (commands waiting for it got a CancelledError: an outside tester's
            chaos run, the gateway's reply reader ended and every request after timed out); a refresh ends by
            itself within its socket timeouts."""
            caller = sys._getframe(0).f_back  # None when a task runs it (redis-py's __aexit__): a close for good
            internal = caller is not None and caller.f_code.co_filename.startswith(REDIS_CODE)
            if internal and self.nodes_manager.slots_cache:
                self._initialize = True
                return
            await super().aclose()

    _refreshing = RefreshingCluster
    return _refreshing


NODE_SKIP_S, NODE_SKIP_MAX_S = 0.5, 2.0  # a node that did not answer is probed after this long (doubling) to come back


class NodeHealth:
    """The nodes of a Redis Cluster that did not answer a pipeline lately, kept by a sync client for its pipelines
    (:func:`_isolating_cluster`; shared by every thread using the client). A node that failed is not sent commands
    until it answers a probe (a PING on a thread of its own, first ``NODE_SKIP_S`` after the failure, then at
    doubling intervals up to ``NODE_SKIP_MAX_S``): its commands fail at once meanwhile. So a node that does not answer
    costs the round trip that found it its timeouts, and no round trip after it waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, list] = {}  # node name -> [probed next at (monotonic), interval, a probe in flight]

    def usable(self, name: str, ping) -> bool:
        """Whether to send this node commands; if not, and its probe is due, start one (``ping()``)."""
        with self._lock:
            down = self._down.get(name)
            if down is None:
                return True
            if down[2] or time.monotonic() < down[0]:
                return False
            down[2] = True
        threading.Thread(target=self._probe, args=(name, ping), name="redis-probe", daemon=True).start()
        return False

    def _probe(self, name: str, ping) -> None:
        try:
            ping()
        except Exception:  # noqa: BLE001 -- any failure: not back yet
            self.failed(name)
        else:
            self.answered(name)
            log.info("redis node answers again", extra={"node": name})

    def failed(self, name: str) -> None:
        with self._lock:
            down = self._down.get(name)
            interval = min(NODE_SKIP_MAX_S, down[1] * 2) if down else NODE_SKIP_S
            self._down[name] = [time.monotonic() + interval, interval, False]
        if down is None:
            log.warning("redis node does not answer: its commands fail at once until it answers a probe",
                        extra={"node": name})

    def answered(self, name: str) -> None:
        if name in self._down:
            with self._lock:
                self._down.pop(name, None)


_isolating: type | None = None


def _isolating_cluster() -> type:
    """redis-py's sync cluster client, except that its pipelines (``transaction=False``) keep each node's failure to
    that node's commands. redis-py sent every command a node failed again on its own, each with its own retries and
    socket timeouts: a round trip with k commands on a node that did not answer took about k x 15 s, then raised, and
    the commands other nodes had run were lost with it (an encoder batch spread over the shards: its healthy jobs,
    acked, never answered; an outside tester's chaos run, a 50 s stall). Here:

    - a node that does not answer (a timeout, a connection refused or cut) fails its own commands, with that error
      as their reply; the other nodes' replies stand. The round trip that finds it waits for its socket timeout
      once, or up to three times when a new connection's handshake is what fails (one try of the whole pipeline,
      redis-py's read of the slot map, one try of that node's commands alone);
    - a node that failed is not sent commands until it answers a probe (:class:`NodeHealth`): its commands fail at
      once meanwhile, and a failed probe reads the slot map again (a failover moves its slots);
    - a command a node redirects (MOVED, ASK, TRYAGAIN: a failover, a slot moving) is sent again on its own, as
      redis-py does, which follows the redirect and updates the slot map.

    Measured (bench/node_away.py, 1 s timeouts, 6 of 12 commands on a paused node): four round trips took 1.0 s in
    all, every answering node's reply kept; redis-py's took 32 s, and three of the four raised. A pipeline with
    ``raise_on_error=True`` still raises the first error, once every node has answered or failed."""
    global _isolating
    if _isolating is not None:
        return _isolating
    from redis.cluster import ClusterPipeline, PipelineStrategy, RedisCluster
    from redis.exceptions import AskError, MovedError, TryAgainError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    redirected = (MovedError, AskError, TryAgainError)

    class IsolatingPipeline(ClusterPipeline):
        health: NodeHealth

        def execute(self, raise_on_error: bool = True) -> list:
            strategy = self._execution_strategy
            stack = list(strategy.command_queue)
            if not stack or not isinstance(strategy, PipelineStrategy):  # a transaction: redis-py's own
                return super().execute(raise_on_error)
            try:
                results = self._send_isolated(stack)
            finally:
                self.reset()
            if raise_on_error and (first := next((r for r in results if isinstance(r, Exception)), None)):
                raise first
            return results

        def _node(self, command):
            """The primary serving the command's keys on the map as it is now (a node the caller named from an
            older map is not kept); None for a command without keys (redis-py places it: the caller's nodes)."""
            try:
                return self.nodes_manager.get_node_from_slot(self.determine_slot(*command.args))
            except (redis.RedisError, RedisClusterException, TypeError):
                return None

        def _ping(self, node) -> None:
            """The probe of a node away (on its own thread). If it fails, the slot map is read again (the node
            tried last): a dead primary's slots move to its replica, and only a fresh map sends their commands
            there (nothing else would read it: the node's commands are no longer sent, so none fails)."""
            try:
                self.get_redis_connection(node).ping()
            except Exception:
                try:
                    self.nodes_manager.initialize(disconnect_startup_nodes_pools=False,
                                                  last_failed_node_name=node.name)
                except Exception as exc:  # noqa: BLE001 -- no node answered: the next probe asks again
                    log.debug("could not read the slot map", extra={"error": describe(exc)})
                raise

        def _send(self, commands: list, results: dict) -> bool:
            """One pipeline over these commands' nodes, no redirects followed, one try: each reply (or error) by
            position. False if redis-py raised, which it does only before it sends anything (a node did not take a
            connection; redis-py has read the slot map again). Its public ``send_cluster_commands`` would try the
            whole pipeline again twice, each try costing that node's timeout."""
            commands = sorted(commands, key=lambda c: c.position)
            sent = True
            try:
                replies = self._execution_strategy._send_cluster_commands(commands, raise_on_error=False,
                                                                          allow_redirections=False)
            except redis.RedisError as exc:
                replies, sent = [exc] * len(commands), False
            except RedisClusterException as exc:  # the cluster client's own (not a RedisError)
                replies, sent = [RedisConnectionError(f"{type(exc).__name__}: {exc}")] * len(commands), False
            results.update((c.position, r) for c, r in zip(commands, replies))
            return sent

        def _place(self, commands: list, results: dict) -> dict[str | None, list]:
            """The commands by node name (None: keyless), each given its node; those of a node known away get
            their failure in ``results`` instead."""
            groups: dict[str | None, list] = {}
            for c in commands:
                node = self._node(c)
                name = node.name if node is not None else None
                if node is not None and not self.health.usable(name, partial(self._ping, node)):
                    results[c.position] = RedisConnectionError(f"Redis node {name} did not answer lately")
                    continue
                if node is not None:
                    c.options["target_nodes"] = node  # placed once: redis-py takes it as given
                groups.setdefault(name, []).append(c)
            return groups

        def _send_isolated(self, stack: list) -> list:
            results: dict[int, object] = {}
            groups = self._place(stack, results)
            sent = [c for group in groups.values() for c in group]
            if sent and not self._send(sent, results):
                # A node did not take a connection, and redis-py sent nothing; it has read the slot map again (a
                # failover may have moved that node's slots). Placed again on that map, each node's commands go
                # apart, once each, so that only a node still away fails its own.
                groups = self._place(sent, results)
                for group in groups.values():
                    self._send(group, results)
                sent = [c for group in groups.values() for c in group]
            for name, group in groups.items():
                if name is None:
                    continue
                if any(isinstance(results[c.position], (RedisConnectionError, RedisTimeoutError)) for c in group):
                    self.health.failed(name)
                else:
                    self.health.answered(name)
            for c in sent:
                if isinstance(results[c.position], redirected):
                    try:
                        results[c.position] = self.parent_execute_command(*c.args, **c.options)
                    except redis.RedisError as exc:
                        results[c.position] = exc
            return [results[c.position] for c in sorted(stack, key=lambda c: c.position)]

    class IsolatingCluster(RedisCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.health = NodeHealth()

        def pipeline(self, transaction=None, shard_hint=None):
            pipe = super().pipeline(transaction, shard_hint)
            pipe.__class__ = IsolatingPipeline  # redis-py's, built by redis-py (its arguments change by version)
            pipe.health = self.health
            return pipe

    _isolating = IsolatingCluster
    return _isolating


def cluster_mode(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster node (see the module docstring); asked once per process and URL."""
    setting = os.environ.get(CLUSTER_ENV, "auto").strip().lower()
    if setting in ("yes", "1", "true"):
        return True
    if setting in ("no", "0", "false"):
        return False
    if setting != "auto":
        raise ValueError(f"{CLUSTER_ENV} must be auto, yes or no, got {setting!r}")
    if url not in _modes:
        probe = redis.Redis.from_url(url, socket_timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S)
        try:
            _modes[url] = str(probe.info("cluster").get("cluster_enabled", 0)) == "1"
        except redis.RedisError as exc:
            log.warning("cannot ask the Redis server whether it is a cluster; taking it for a single server (set "
                        f"{CLUSTER_ENV}=yes if it is a cluster)", extra={"redis": redact(url), "error": describe(exc)})
            return False  # not remembered: the next connection asks again
        finally:
            probe.close()
        if _modes[url]:
            log.info("redis cluster detected", extra={"redis": redact(url)})
    return _modes[url]


def connect(url: str, retries: int = 2, socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    from redis.retry import Retry

    url = with_password_file(url)
    if cluster_mode(url):
        # The retry covers the cluster's own errors too (a node down, a slot moving): at least one retry, so a
        # failover is followed by a fresh slot map.
        # (A TLS cluster URL's own connection class overrides this one: hiredis packs every command there.)
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), max(retries, 1))
        client = _isolating_cluster().from_url(url, retry=retry, require_full_coverage=False,
                                               connection_class=_connection_class(url), **_options(socket_timeout))
        client.commands_parser = _StreamKeys(client.commands_parser)  # pipelines made from now on share it
        return client
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries, tuple(RETRY_ERRORS))
    return redis.Redis.from_url(url, retry=retry, connection_class=_connection_class(url), **_options(socket_timeout))


def connect_async(url: str, retries: int = 2, socket_timeout: float = SOCKET_TIMEOUT_S,
                  max_connections: int = ASYNC_MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio client. Its pool holds up to ``max_connections`` connections (per node of a cluster); past that,
    a command waits for a free one (at most ``socket_timeout``) instead of failing at once, as redis-py's default
    pool does past 100: a burst of concurrent requests is not a Redis outage."""
    from redis.asyncio.retry import Retry

    url = with_password_file(url)
    if cluster_mode(url):
        options = _options(socket_timeout)
        # The asyncio cluster client takes no such option: it retries a timeout as a node failure, after a fresh
        # slot map (so a node that does not answer costs a call two socket timeouts: the gateway bounds its own
        # waits above that, gateway/encoding.ENCODE_SLACK_S)
        del options["retry_on_timeout"]
        client = _refreshing_cluster().from_url(
            url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), max(retries, 1)), require_full_coverage=False,
            max_connections=max_connections, **options)
        client.commands_parser = _AsyncStreamKeys(client.commands_parser, client)
        return client
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries, tuple(RETRY_ERRORS)), **_options(socket_timeout))
    return aioredis.Redis.from_pool(pool)
