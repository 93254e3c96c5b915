"""The Retry-After of a refusal at --max-inflight: a fixed second against gateway.monitor.BusyHint, in one run.

A simulation, not a cluster: N clients in a closed loop (each request admitted is followed, after 1-2 s of think
time, by the next; each refused one comes back after the Retry-After it was told, with the gateway's
retry-after-ms jitter) against a gateway that admits C requests a second. Both policies see the same clients and the
same seeds. A client gives a request up after 5 retries (the OpenAI SDKs' max_retries is 2; 5 is generous) and
starts its next after its think time. It prints, per load, what each policy got done a second, the share of tries
refused, the share of requests given up, and the median Retry-After told, and the ratios adaptive / fixed.

    .venv/bin/python bench/retry_hint.py            # a second or two; --seconds, --capacity
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from gateway.monitor import BusyHint


class Fixed:
    """The policy before BusyHint: always 1 s."""

    def __init__(self):
        self.refused = self.finished = 0

    def value(self, now: float) -> int:
        return 1


def simulate(policy, clients: int, capacity: float, seconds: float, seed: int = 1, dt: float = 0.05):
    rng = random.Random(seed)
    policy.since = 0.0
    due = [rng.random() * 2 for _ in range(clients)]
    retries = [0] * clients
    budget, done, refused, tries, told, gave_up, t = 0.0, 0, 0, 0, [], 0, 0.0
    while t < seconds:
        hint = policy.value(t)
        budget = min(budget + capacity * dt, capacity * dt * 2)  # slots freed this tick (unused ones are lost)
        for i in range(clients):
            if due[i] > t:
                continue
            tries += 1
            if budget >= 1:
                budget -= 1
                done += 1
                policy.finished += 1
                retries[i] = 0
                due[i] = t + 1.0 + rng.random()
            else:
                refused += 1
                policy.refused += 1
                told.append(hint)
                retries[i] += 1
                if retries[i] > 5:  # given up: the next request after the think time
                    gave_up, retries[i] = gave_up + 1, 0
                    due[i] = t + 1.0 + rng.random()
                else:
                    due[i] = t + hint + rng.uniform(0.0, min(0.5 * hint, 2.0))
        t += dt
    return (done / seconds, refused / max(tries, 1), gave_up / max(gave_up + done, 1),
            statistics.median(told) if told else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--capacity", type=float, default=25.0, help="requests the gateway finishes a second")
    args = ap.parse_args()
    print(f"{'clients':>8} {'N/C s':>6} | {'fixed: done/s':>13} {'refused':>8} {'gave up':>8} | {'hint: done/s':>12}"
          f" {'refused':>8} {'gave up':>8} {'RA p50':>7} | {'done ratio':>10} {'refused ratio':>13}")
    for clients in (20, 60, 100, 200, 1000):
        fixed = simulate(Fixed(), clients, args.capacity, args.seconds)
        hinted = simulate(BusyHint(), clients, args.capacity, args.seconds)
        print(f"{clients:>8} {clients / args.capacity:>6.1f} | {fixed[0]:>13.1f} {fixed[1]:>8.2f} {fixed[2]:>8.2f} | "
              f"{hinted[0]:>12.1f} {hinted[1]:>8.2f} {hinted[2]:>8.2f} {hinted[3]:>7} | {hinted[0] / fixed[0]:>10.2f} "
              f"{(hinted[1] / fixed[1]) if fixed[1] else math.nan:>13.2f}")


if __name__ == "__main__":
    main()
