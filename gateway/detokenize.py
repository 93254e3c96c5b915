"""Incremental detokenization and stop strings.

Text is released only when it is final: a token that ends inside a multi-byte character decodes to U+FFFD and waits
for the next one (prefix/read offsets, as TGI and vLLM do), and while stop strings are set, the last
``len(longest stop) - 1`` characters are held back so that a stop string split across tokens is never half sent.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all final text so far
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text now safe to send (maybe empty). Sets ``stopped`` on a stop string."""
        for tok in token_ids:
            if self.stopped:
                break
            self.ids.append(tok)
            self.text += self._next_piece()
            self._check_stop()
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent, a trailing incomplete character included (as the
        whole decode renders it, U+FFFD), so the deltas always add up to ``decode(ids, skip_special_tokens=True)``."""
        if not self.stopped:
            self.text += self._next_piece(final=True)
            self._check_stop()
        return self._release(final=True)

    def _next_piece(self, final: bool = False) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def _check_stop(self) -> None:
        if not self.stop:
            return
        start = max(0, self.sent - self.hold)  # a match can only begin in the unsent tail
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out
