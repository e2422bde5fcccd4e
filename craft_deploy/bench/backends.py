"""Inference backends, one registered class each with the same interface; a missing one says what to install."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from craft_deploy import CraftError

BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    """Class decorator adding a Backend to the registry under `name`."""

    def deco(cls: type[Backend]) -> type[Backend]:
        BACKENDS[name] = cls
        cls.name = name
        return cls

    return deco


class Backend:
    """Runs a model on numpy batches (N, C, H, W) float32 and returns logits as numpy."""

    name = "base"
    needs = "onnx"  # "onnx": an ONNX file; "bundle": a model bundle directory

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not)."""
        return True, ""

    def prepare(self, batch: np.ndarray) -> Any:
        """Turn a host batch into what `run` takes (e.g. a device tensor); not timed."""
        return batch

    def run(self, prepared: Any) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until submitted work has finished (a no-op on CPU backends)."""

    def info(self) -> dict[str, Any]:
        return {}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


class _OrtBackend(Backend):
    provider = "CPUExecutionProvider"
    install_hint = "pip install onnxruntime"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        providers = _ort_providers()
        if not providers:
            return False, f"onnxruntime is not installed ({cls.install_hint})"
        if cls.provider not in providers:
            return False, f"onnxruntime has no {cls.provider} here (available: {', '.join(providers)}; {cls.install_hint})"
        return True, ""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__(path, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[self.provider])
        except Exception as e:
            raise CraftError(f"{path} could not be loaded as an ONNX model by onnxruntime: {str(e)[:300]}") from e
        self.input_name = self.session.get_inputs()[0].name

    def run(self, prepared: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: prepared})[0]

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": self.session.get_providers()}


@register_backend("ort-cpu")
class OrtCpu(_OrtBackend):
    """ONNX Runtime, CPU execution provider."""


@register_backend("ort-cuda")
class OrtCuda(_OrtBackend):
    """ONNX Runtime, CUDA execution provider."""

    provider = "CUDAExecutionProvider"
    install_hint = "pip install 'craft-deploy[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU"


@register_backend("ort-trt")
class OrtTensorrt(_OrtBackend):
    """ONNX Runtime, TensorRT execution provider."""

    provider = "TensorrtExecutionProvider"
    install_hint = "pip install 'craft-deploy[gpu,tensorrt]' on a machine with an NVIDIA GPU and TensorRT"


@register_backend("tensorrt")
class TensorrtEngine(Backend):
    """A serialized TensorRT engine (built by `craft-deploy export --format tensorrt`)."""

    needs = "engine"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "TensorRT is not installed (pip install 'craft-deploy[tensorrt]' on an NVIDIA GPU machine)"
        return False, "TensorRT engine benchmarking is not implemented in this version of craft-deploy"


@register_backend("pytorch")
class PyTorchEager(Backend):
    """The model bundle in PyTorch eager mode, on CPU."""

    needs = "bundle"

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__(path, threads)
        import torch

        from craft_deploy.models import load_bundle

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_bundle(path).model.eval()

    def run(self, prepared: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(prepared)).numpy()

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads()}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name`, checked to be usable here."""
    if name not in BACKENDS:
        raise CraftError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}")
    cls = BACKENDS[name]
    ok, why = cls.availability()
    if not ok:
        raise CraftError(f"backend {name} is not usable here: {why}")
    return cls
