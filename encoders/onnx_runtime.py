"""Encoder runtime on ONNX Runtime: CPUExecutionProvider, or CUDAExecutionProvider when onnxruntime-gpu and a GPU
are present. It logs which provider actually runs, since ORT silently falls back to the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class OnnxRuntime:
    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(device.split(":")[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            else:
                log.warning("CUDA requested but this onnxruntime has no CUDAExecutionProvider "
                            "(install the 'gpu' extra, onnxruntime-gpu); running on the CPU")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_name = self.input_names[0]
        log.info("onnx runtime ready", extra={"model": str(path), "provider": self.provider,
                                              "requested_device": device})

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {self.input_name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
        if (lengths is None) != (len(self.input_names) == 1):
            raise ValueError(f"this ONNX encoder takes inputs {self.input_names}; lengths given: {lengths is not None}")
        if lengths is not None:
            feeds[self.input_names[1]] = np.ascontiguousarray(lengths.numpy(), dtype=np.int64)
        return torch.from_numpy(self.session.run(None, feeds)[0])
