"""What a flood of large request bodies does to the gateway's event loop, in one run: the loop's lag (a 10 ms sleep's
late wake-up) while six clients' bodies are parsed on threads all at once (as before) and one at a time (the gateway's
``LARGE_PARSE``: bodies over 64 KiB take turns), alternating.

Parsing and validating holds the GIL in C code (json's decoder, the schema's validation and its error list), so the
loop waits behind whichever parsing thread holds it; an outside tester's six clients sending 99,000 wrong ``stop``
values each slowed a small request to 5-8 s. Bodies: 99,000 wrong ``stop`` values (under ``MAX_VALUES``, a 400) and
33,000 text parts (valid). Usage: ``.venv/bin/python bench/parse_flood.py`` (~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.errors import InvalidRequest  # noqa: E402
from gateway.schemas import parse_chat_request  # noqa: E402

BODIES = {
    "99k wrong stop values": json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                         "stop": [1] * 99_000}).encode(),
    "33k text parts": json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}] * 33_000}]}).encode(),
}


def parse(body: bytes) -> None:
    try:
        parse_chat_request(body)
    except InvalidRequest:
        pass


async def flood(body: bytes, clients: int, seconds: float, one_at_a_time: bool) -> tuple[list[float], int]:
    """The loop's lags (s) while ``clients`` tasks parse ``body`` back to back; and how many parses ended."""
    gate = asyncio.Semaphore(1 if one_at_a_time else clients)
    end = time.monotonic() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while time.monotonic() < end:
            async with gate:
                await asyncio.to_thread(parse, body)
            done += 1

    async def probe() -> list[float]:
        lags = []
        while time.monotonic() < end:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t0 - 0.01)
        return lags

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    lags = await probe()
    await asyncio.gather(*tasks)
    return lags, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0, help="per flood")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two ways, per body")
    args = ap.parse_args()
    print(f"{args.clients} clients, {args.seconds:g} s floods, {args.rounds} rounds each way, alternating")
    print(f"{'body':<24}{'parsed':<16}{'loop lag p50 ms':>16}{'p99 ms':>9}{'max ms':>9}{'parses/s':>10}")
    for name, body in BODIES.items():
        results = {False: ([], 0), True: ([], 0)}
        for _ in range(args.rounds):
            for one in (False, True):
                lags, done = asyncio.run(flood(body, args.clients, args.seconds, one))
                results[one] = (results[one][0] + lags, results[one][1] + done)
        rows = {}
        for one, (lags, done) in results.items():
            lags.sort()
            p50, p99 = statistics.median(lags) * 1e3, lags[int(0.99 * (len(lags) - 1))] * 1e3
            rows[one] = (p50, p99, lags[-1] * 1e3, done / (args.rounds * args.seconds))
            way = "one at a time" if one else "all at once"
            print(f"{name:<24}{way:<16}{p50:>16.1f}{p99:>9.1f}{rows[one][2]:>9.1f}{rows[one][3]:>10.1f}")
        print(f"{'':<24}{'ratio':<16}{rows[False][0] / max(rows[True][0], 1e-3):>15.1f}x"
              f"{rows[False][1] / max(rows[True][1], 1e-3):>8.1f}x{rows[False][2] / max(rows[True][2], 1e-3):>8.1f}x"
              f"{rows[True][3] / max(rows[False][3], 1e-9):>9.2f}x  (all at once / one at a time; parses/s: one / all)")


if __name__ == "__main__":
    main()
