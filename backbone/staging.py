"""Host-to-device copies that do not wait for the device."""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A host list (or CPU tensor) on ``device`` without waiting for the device: on CUDA it is staged in pinned
    memory (unless it is pinned already) and copied asynchronously on the current stream (a plain copy would wait for
    every queued kernel)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


class ToHost:
    """A device tensor on its way to the host: the copy is queued now (pinned memory, the tensor's device's current
    stream: twice a pageable copy's speed) and waited for only by :meth:`wait` or :meth:`tolist`, so the host can do
    other work while the device finishes the step. The wait covers everything queued on that stream before, not
    what is queued after."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t

    def wait(self) -> torch.Tensor:
        """The tensor on the host, once the copy is done."""
        if self.event is not None:
            self.event.synchronize()
        return self.host

    def tolist(self) -> list:
        return self.wait().tolist()
