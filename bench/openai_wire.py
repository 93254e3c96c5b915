"""The OpenAI chat-completions wire format the bench's baseline servers write (bench/monolith.py, bench/rayserve.py):
one place, so both answer exactly as Tributary's clients expect."""

from __future__ import annotations

import json
import time
import uuid


class Completion:
    def __init__(self, model: str, request_id: str | None = None):
        self.model, self.id, self.created = model, f"chatcmpl-{request_id or uuid.uuid4().hex}", int(time.time())

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        """One SSE event: a delta (and a finish reason), or the closing usage chunk."""
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            c["choices"], c["usage"] = [], usage
        return f"data: {json.dumps(c)}\n\n"

    def body(self, text: str, finish: str, usage: dict) -> dict:
        """A non-streamed response."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
