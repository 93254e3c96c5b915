"""Worker process set-up: graceful shutdown (SIGTERM/SIGINT/SIGHUP set a flag the busy loop checks between steps, so
the work in hand is finished and acknowledged before the process exits; a closed terminal's SIGHUP would otherwise
kill it mid-step) and allocator tuning."""

from __future__ import annotations

import ctypes
import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each a graceful stop, in every process


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    received = []  # signals, not ``stop``: a pipeline shard's drain may set it too, and a signal after is a first

    def handler(signum, _frame):
        received.append(signum)
        if len(received) > 1:
            log.warning("second signal: exiting without draining", extra={"signal": signum})
            raise SystemExit(128 + signum)  # the shell's code for "ended by this signal": a stop, not a crash
        log.info("stopping: finishing the work in hand", extra={"signal": signum})
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return stop


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's own dynamic ceiling: activations below it come from the heap
TRIM_THRESHOLD = 256 << 20  # freed heap memory kept for the next request instead of returned to the kernel


def tune_allocator() -> bool:
    """Keep a worker's freed activation memory in its heap between requests (glibc only; a no-op elsewhere).

    With glibc's defaults (a dynamic mmap threshold that starts at 128 KiB, the heap top trimmed past twice that) a
    model worker hands the activations of each forward back to the kernel and faults them in again on the next:
    ~9-11k page faults and 30-40 ms of kernel time per request in the small demo's backbone, 2-6k faults in each
    encoder (bench/skeleton_latency.py). Fixed thresholds make that ~0 at the cost of keeping up to TRIM_THRESHOLD
    of freed memory per worker. Call it before loading the weights.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False


def device_problem(device: str, flag: str = "--device") -> str | None:
    """What is wrong with a ``--device`` (cpu, auto, cuda or cuda:N, spelled right) on this machine, as words for a
    one-line error: a CUDA device this process does not see. None when there is nothing wrong. Every worker checks
    its own before loading anything, and ``tributary up`` its workers' before starting any."""
    if not device.startswith("cuda"):
        return None
    import torch

    visible = torch.cuda.device_count()
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index < visible:
        return None
    return (f"{flag} {device}: " + (f"this process sees {visible} CUDA device(s)" if visible
                                      else "no CUDA device is visible to this process"))
