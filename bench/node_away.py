"""One Redis Cluster node that does not answer (SIGSTOP: a hung host, a partition), and the workers' pipelines: how
long a round trip spread over the three primaries takes, and what comes of the replies of the nodes that answer, on
redis-py's cluster client with the options and retries ``connect`` gives it (before) and on
:func:`cache.client.connect`'s own client (now, ``_isolating_cluster``).

    .venv/bin/python bench/node_away.py [--commands 12] [--round-trips 4] [--socket-timeout 1.0] [--json out.json]

Prints, measured in one run on one embedded 3-primary cluster on loopback (each client its own run of the same
pause): per round trip, the seconds it took and how many of the answering nodes' replies came back (redis-py raises
the first error, and the round trip's replies are lost with it); then the ratio of the seconds the round trips took
in all. A worker's own socket timeout is 5 s: its figures scale with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache.client as client_module  # noqa: E402
from cache.client import connect, lost_node  # noqa: E402
from cache.embedded import EmbeddedCluster  # noqa: E402


def run(client, away_keys: list[str], other_keys: list[str], round_trips: int) -> list[dict]:
    rows = []
    for i in range(round_trips):
        pipe = client.pipeline(transaction=False)
        for key in away_keys + other_keys:
            pipe.set(key, i)
        t0 = time.monotonic()
        try:
            res = pipe.execute(raise_on_error=False)
            kept = sum(r is True for r in res[len(away_keys):])
            failed = sum(map(lost_node, res[: len(away_keys)]))
            raised = ""
        except Exception as exc:  # noqa: BLE001 -- redis-py's way: the first error, the other replies lost
            kept, failed, raised = 0, len(away_keys), type(exc).__name__
        rows.append({"seconds": round(time.monotonic() - t0, 3), "answering_replies": kept,
                     "of": len(other_keys), "failed_on_node_away": failed, "raised": raised})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commands", type=int, default=12, help="commands per round trip (half on the node away)")
    p.add_argument("--round-trips", type=int, default=4)
    p.add_argument("--socket-timeout", type=float, default=1.0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    from redis.cluster import RedisCluster

    results = {}
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        away = cluster.live()[0]
        keys = [f"bench:{{{i}}}" for i in range(10 * args.commands)]
        away_keys = [k for k in keys if cluster.primary_of(k) is away][: args.commands // 2]
        other_keys = [k for k in keys if cluster.primary_of(k) is not away][: args.commands - len(away_keys)]
        now = connect(cluster.url, socket_timeout=args.socket_timeout)
        client_module._isolating = RedisCluster  # redis-py's own class, with connect's options and retries
        try:
            before = connect(cluster.url, socket_timeout=args.socket_timeout)
        finally:
            client_module._isolating = None
        for name, client in (("before (redis-py)", before), ("now (connect)", now)):
            client.ping()
            os.kill(away.proc.pid, signal.SIGSTOP)
            try:
                results[name] = run(client, away_keys, other_keys, args.round_trips)
            finally:
                os.kill(away.proc.pid, signal.SIGCONT)
            time.sleep(2 * args.socket_timeout + 1)  # the node answers again before the next client's run
            client.close()
    print(f"{args.commands} commands a round trip ({len(away_keys)} on the node away), "
          f"socket timeout {args.socket_timeout:g} s")
    for name, rows in results.items():
        for i, row in enumerate(rows):
            print(f"  {name:18s} round trip {i + 1}: {row['seconds']:6.2f} s, {row['answering_replies']}/{row['of']} "
                  f"answering nodes' replies" + (f", raised {row['raised']}" if row["raised"] else ""))
    total = {name: sum(r["seconds"] for r in rows) for name, rows in results.items()}
    b, n = total["before (redis-py)"], total["now (connect)"]
    print(f"all {args.round_trips} round trips: before {b:.2f} s, now {n:.2f} s: {b / max(n, 1e-3):.1f}x less waiting")
    if args.json:
        Path(args.json).write_text(json.dumps({"socket_timeout_s": args.socket_timeout, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
