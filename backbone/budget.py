"""How many new positions the next step may compute: a fixed cap, or a step-time target learned online.

A step that carries decodes is the time every running stream waits for its next token, so a prefill chunk riding
along is paid for in inter-token latency. With ``target_ms`` set (``--max-step-ms``), the budget of a step that
carries decodes is the number of positions the machine computes in that time, as Sarathi-Serve sizes its token
budget from a latency SLO; instead of profiling it once, the cost is learned from the steps the engine runs (their
load changes with the thread budget, the context lengths and the hardware):

    step time ~= a + b * positions        (exponentially weighted least squares over recent steps)

A step with no decodes (nobody waits on it) takes the whole cap: prefill runs at full efficiency when no stream is
running. Without a target the cap is the budget, decodes included. Until there is spread enough in the observed
sizes to fit a slope, the cost is taken as proportional (a = 0, b = mean time / mean positions), which overestimates
a decode-only step's per-position cost and so errs towards small chunks; the first mixed steps then give the slope.
Every prefilling step gets at least ``min_chunk`` positions, so new requests always advance.

Only the step's compute is timed (from its launch to its answers being on the host), not the worker's Redis I/O.
"""

from __future__ import annotations


class StepBudget:
    def __init__(self, max_tokens: int, target_ms: float | None = None, min_chunk: int = 16, decay: float = 0.95):
        if max_tokens < 1:
            raise ValueError("max_batched_tokens must be >= 1")
        if target_ms is not None and not target_ms > 0:
            raise ValueError("max_step_ms must be > 0")
        self.max_tokens = max_tokens
        self.target_ms = target_ms
        self.min_chunk = max(1, min(min_chunk, max_tokens))
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed sums of 1, n, t, n^2, n*t

    def observe(self, positions: int, seconds: float) -> None:
        """A step of ``positions`` new positions took ``seconds`` (launch to answers on the host)."""
        if positions < 1 or not seconds > 0 or self.target_ms is None:
            return
        d, ms = self.decay, seconds * 1e3
        self._w = d * self._w + 1
        self._x = d * self._x + positions
        self._y = d * self._y + ms
        self._xx = d * self._xx + positions * positions
        self._xy = d * self._xy + positions * ms

    def cost(self) -> tuple[float, float] | None:
        """(a ms, b ms per position) of the fitted step time, None before any step was seen."""
        if self._w == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1.0:  # positions differed enough across steps to fit a line
            b = (self._xy / self._w - mx * my) / var
            if b > 0:
                return max(0.0, my - b * mx), b
        return 0.0, my / mx

    def tokens(self, decodes: int) -> int:
        """New positions the next step may compute, its ``decodes`` (one each) included; prefill gets the rest, at
        least ``min_chunk`` (within the cap, as without a target)."""
        fit = self.cost() if self.target_ms is not None and decodes else None
        if fit is None:
            return self.max_tokens
        a, b = fit
        return min(self.max_tokens, max(int((self.target_ms - a) / b + 1e-6), decodes + self.min_chunk))
