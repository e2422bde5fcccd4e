"""Running a serialized TensorRT 10/11 engine with the name-based tensor API: what export verifies a built engine with
and what bench times. TensorRT is imported on use, with the extra to install named when it is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from craft_deploy import CraftError

INSTALL_HINT = "pip install 'craft-deploy[tensorrt]' (TensorRT 10 or 11) on a machine with an NVIDIA GPU"


def import_tensorrt():
    """The tensorrt module, or a CraftError with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise CraftError(f"--format tensorrt needs TensorRT, which is not installed: {INSTALL_HINT}") from e
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise CraftError(f"TensorRT {trt.__version__} is too old: craft-deploy builds with TensorRT 10.x or 11.x")
    return trt


class EngineRunner:
    """One engine on the current CUDA device: `prepare` a host batch, `run` it, read the logits back."""

    def __init__(self, path: Path, include_transfer: bool = False):
        import torch

        trt = import_tensorrt()
        self.path, self.include_transfer = path, include_transfer
        self.torch, self.trt = torch, trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise CraftError(
                f"{path} could not be deserialized by TensorRT {trt.__version__} (built by another version "
                "or for another GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CraftError(f"{path}: expected one input and one output tensor, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.stream = torch.cuda.Stream()

    def prepare(self, batch: np.ndarray):
        """The batch as a tensor of the engine's input dtype, on the GPU unless transfers are timed."""
        x = self.torch.from_numpy(np.ascontiguousarray(batch, dtype=self.input_dtype))
        return x if self.include_transfer else x.cuda()

    def run(self, prepared) -> np.ndarray:
        """The engine's logits for one prepared batch, as float32 numpy."""
        torch = self.torch
        with torch.cuda.stream(self.stream):
            x = prepared.cuda(non_blocking=True)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
            y = torch.empty(out_shape, dtype=torch.from_numpy(np.zeros(0, out_dtype)).dtype, device="cuda")
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CraftError(f"TensorRT failed to run {self.path} on a batch of shape {tuple(x.shape)}")
            y = y.float().cpu()  # waits for the stream
        return y.numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def info(self) -> dict[str, Any]:
        return {"tensorrt": self.trt.__version__, "gpu": self.torch.cuda.get_device_name(0)}
