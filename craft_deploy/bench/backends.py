"""Inference backends, one registered class each with the same interface; a missing one says what to install."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from craft_deploy import CraftError
from craft_deploy.runtimes.onnx_session import timing_options
from craft_deploy.runtimes.openvino_runtime import import_openvino
from craft_deploy.toolkit.registry import name_registrar

BACKENDS: dict[str, type[Backend]] = {}


register_backend = name_registrar(BACKENDS)
"""Class decorator adding a class to BACKENDS under a name."""


class Backend:
    """Runs a model on numpy batches (N, C, H, W) float32 and returns logits as numpy."""

    name = "base"
    # what the backend runs: "onnx" (an ONNX file), "bundle" (a model bundle directory), "engine" (a TensorRT
    # engine), "ep" (a torch-tensorrt ExportedProgram) or "pt2" (an AOTInductor package); the last three sit beside a
    # metadata.json
    needs = "onnx"
    # the largest batch the artifact takes (None: any); an AOTI package's shapes are fixed when it is compiled
    max_batch: int | None = None
    # also runs an OpenVINO IR (model.xml + metadata.json from export --format openvino)
    reads_ir = False

    def __init__(
        self,
        path: Path,
        threads: int | None = None,
        compile: bool = False,
        include_transfer: bool = False,
        precision: str = "fp32",
        kernels: str | None = None,
    ):
        self.path = path
        self.threads = threads
        self.compile = compile
        self.include_transfer = include_transfer
        self.precision = precision
        self.kernels = kernels

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

    @property
    def checks_reference(self) -> bool:
        """Whether this backend changes the model it runs (then `reference_check` compares the two)."""
        return False

    def reference_check(self, images: np.ndarray) -> dict[str, Any] | None:
        """Compare this backend's logits on `images` with the model it was made from, judged by the tolerance policy
        (None where the backend runs the model as it is: an export was verified when it was written)."""
        return None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


class _OrtBackend(Backend):
    provider = "CPUExecutionProvider"
    install_hint = "pip install onnxruntime"
    device = "cpu"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        providers = _ort_providers()
        if not providers:
            return False, f"onnxruntime is not installed ({cls.install_hint})"
        if cls.provider not in providers:
            return (
                False,
                f"onnxruntime has no {cls.provider} here (available: {', '.join(providers)}; {cls.install_hint})",
            )
        return True, ""

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        import onnxruntime as ort

        opts = timing_options(threads)  # every optimisation, no spin-waiting
        self.spinning = False
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[self.provider])
        except Exception as e:
            raise CraftError(f"{path} could not be loaded as an ONNX model by onnxruntime: {str(e)[:300]}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def prepare(self, batch: np.ndarray):
        """On a GPU provider the input is copied to the device once, unless the copy is to be timed."""
        if self.device == "cpu" or self.include_transfer:
            return batch
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(batch, self.device, 0)

    def run(self, prepared) -> np.ndarray:
        if self.device == "cpu":
            return self.session.run(None, {self.input_name: prepared})[0]
        binding = self.session.io_binding()
        if isinstance(prepared, np.ndarray):
            binding.bind_cpu_input(self.input_name, prepared)  # host-to-device copy inside the timed call
        else:
            binding.bind_ortvalue_input(self.input_name, prepared)
        binding.bind_output(self.output_name, self.device)
        self.session.run_with_iobinding(binding)  # returns once the device work is done
        return binding.copy_outputs_to_cpu()[0]

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "onnxruntime": ort.__version__,
            "providers": self.session.get_providers(),
            "threads": self.threads,
            "spinning": self.spinning,
        }


@register_backend("ort-cpu")
class OrtCpu(_OrtBackend):
    """ONNX Runtime, CPU execution provider."""


@register_backend("ort-cuda")
class OrtCuda(_OrtBackend):
    """ONNX Runtime, CUDA execution provider."""

    provider = "CUDAExecutionProvider"
    install_hint = "pip install 'craft-deploy[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU"
    device = "cuda"


@register_backend("ort-trt")
class OrtTensorrt(_OrtBackend):
    """ONNX Runtime, TensorRT execution provider."""

    provider = "TensorrtExecutionProvider"
    install_hint = "pip install 'craft-deploy[gpu,tensorrt]' on a machine with an NVIDIA GPU and TensorRT"
    device = "cuda"


def _cuda_available() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch on this machine"
    return True, ""


@register_backend("tensorrt")
class TensorrtEngine(Backend):
    """A serialized TensorRT 10/11 engine (`model.engine` + `metadata.json`), run with the name-based tensor API."""

    needs = "engine"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "TensorRT is not installed (pip install 'craft-deploy[tensorrt]' on an NVIDIA GPU machine)"
        return _cuda_available()

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        from craft_deploy.runtimes.tensorrt_runner import EngineRunner

        self.runner = EngineRunner(path, self.include_transfer)

    def prepare(self, batch: np.ndarray):
        return self.runner.prepare(batch)

    def run(self, prepared) -> np.ndarray:
        return self.runner.run(prepared)

    def synchronize(self) -> None:
        self.runner.synchronize()

    def info(self) -> dict[str, Any]:
        return self.runner.info()


@register_backend("torch-tensorrt")
class TorchTensorrt(Backend):
    """A torch-tensorrt compiled program saved as an ExportedProgram (`model.ep` + `metadata.json`)."""

    needs = "ep"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            return (
                False,
                "torch-tensorrt is not installed (pip install 'craft-deploy[tensorrt]' on an NVIDIA GPU machine)",
            )
        return _cuda_available()

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        import torch
        import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops the program calls)

        self.torch = torch
        self.module = torch.export.load(str(path)).module()

    def prepare(self, batch: np.ndarray):
        x = self.torch.from_numpy(batch)
        return x if self.include_transfer else x.cuda()

    def run(self, prepared) -> np.ndarray:
        with self.torch.no_grad():
            return self.module(prepared.cuda()).float().cpu().numpy()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def info(self) -> dict[str, Any]:
        import torch_tensorrt

        return {"torch_tensorrt": torch_tensorrt.__version__, "gpu": self.torch.cuda.get_device_name(0)}


@register_backend("pytorch")
class PyTorchEager(Backend):
    """The model bundle in PyTorch on CUDA when available: eager or torch.compile (--compile), in fp32/bf16/fp16
    (--precision), with real INT8/FP8/2:4 kernels in place of the Linear layers' fake-quant (--kernels)."""

    needs = "bundle"

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        import torch

        from craft_deploy.bench.torch_kernels import PRECISIONS, kernel_model
        from craft_deploy.models import load_bundle

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        changed = self.kernels is not None or self.precision != "fp32"
        # what a changed model is checked against: the bundle as compressed, fake-quant included, in fp32
        self.reference = load_bundle(path).model.eval().to(self.device) if changed else None
        model, self.kernel_info = kernel_model(load_bundle(path).model, self.kernels, self.precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        if self.compile and any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules()):
            # Inductor converts conv nets to channels-last; cuDNN then runs bf16 depthwise convs with a generic NHWC
            # engine (3457 launches for tf_efficientnet_lite0 at batch 32 on an H100: 30 ms vs 2.5 ms in NCHW)
            import torch._inductor.config as inductor_config

            inductor_config.layout_optimization = False
        self.model = torch.compile(model) if self.compile else model

    def prepare(self, batch: np.ndarray):
        x = self.torch.from_numpy(batch)
        return x if self.include_transfer else x.to(self.device, self.dtype)

    def run(self, prepared) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(prepared.to(self.device, self.dtype)).float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    @property
    def checks_reference(self) -> bool:
        return self.reference is not None

    def reference_check(self, images: np.ndarray) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        from craft_deploy.runtimes.tolerance import compare_outputs, judge

        with self.torch.no_grad():
            ref = self.reference(self.torch.from_numpy(images).to(self.device)).float().cpu().numpy()
        check = compare_outputs(ref, self.run(self.prepare(images)))
        check["against"] = "the bundle in fp32 PyTorch (its fake-quant included)"
        check["passed"] = judge(check, "int8" if self.kernels in ("int8", "fp8") else self.precision, None)
        return check

    def info(self) -> dict[str, Any]:
        return {
            "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(),
            "device": self.device,
            "gpu": self.torch.cuda.get_device_name(0) if self.device == "cuda" else None,
            "compile": self.compile,
            **self.kernel_info,
        }


@register_backend("aoti")
class AotiPackage(Backend):
    """An AOTInductor package (`model.pt2` + `metadata.json` from `export --format aoti`), on the device it was
    compiled for."""

    needs = "pt2"

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        import torch

        from craft_deploy.artifacts import read_json
        from craft_deploy.runtimes.aoti import load_package

        info = read_json(Path(path).with_name("metadata.json"), "AOTI metadata").get("aoti") or {}
        self.device = info.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CraftError(f"{path} was compiled for a CUDA GPU and none is visible here; export it again on a CPU")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.info_ = torch, info
        self.dtype = torch.float16 if info.get("dtype") == "float16" else torch.float32
        self.max_batch = (info.get("batch_range") or [1, None])[1]
        self.program = load_package(path)

    def prepare(self, batch: np.ndarray):
        x = self.torch.from_numpy(batch).to(dtype=self.dtype)
        return x if self.include_transfer else x.to(self.device)

    def run(self, prepared) -> np.ndarray:
        with self.torch.no_grad():
            return self.program(prepared.to(self.device)).float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads(), **self.info_}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name`, checked to be usable here."""
    if name not in BACKENDS:
        raise CraftError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}")
    cls = BACKENDS[name]
    ok, why = cls.availability()
    if not ok:
        raise CraftError(f"backend {name} is not usable here: {why}")
    return cls


OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # --precision -> INFERENCE_PRECISION_HINT


@register_backend("openvino")
class OpenVino(Backend):
    """OpenVINO on this CPU, running an exported ONNX file (FP32, FP16, or our Q/DQ INT8, which it runs with its own
    low-precision kernels) with `--precision` fp32|bf16|fp16 as its inference precision hint and `--threads` as its
    thread count; one model compiled per batch size (static shapes). OpenVINO is another runtime than the one export
    verified, so before timing its logits are checked against the same file in ONNX Runtime on real images, under the
    tolerance policy of what it computes (Q/DQ: INT8's; bf16 and fp16 hints: theirs). It also runs the IR `export
    --format openvino` writes (model.xml), checked against the model.onnx beside it."""

    reads_ir = True

    def __init__(self, path: Path, threads: int | None = None, **kw):
        super().__init__(path, threads, **kw)
        ov = import_openvino()
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as e:
            raise CraftError(f"{path} could not be read by OpenVINO: {str(e)[:300]}") from e
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[self.precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.requests: dict[int, Any] = {}
        # an IR's reference is the verified model.onnx export leaves beside it
        self.onnx_path = Path(path).with_name("model.onnx") if Path(path).suffix == ".xml" else Path(path)
        # OpenVINO reads Q/DQ pairs (ONNX) and quantized IRs alike as FakeQuantize (INT8) / FakeConvert (FP8)
        self.quantized = bool({op.get_type_name() for op in self.model.get_ops()} & {"FakeQuantize", "FakeConvert"})

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, "openvino is not installed (pip install 'craft-deploy[openvino]')"
        return True, ""

    def _request(self, batch: int):
        """An infer request of the model compiled for `batch` images (compiled on first use: not timed)."""
        if batch not in self.requests:
            model = self.model.clone()
            dims = model.input(0).get_partial_shape()
            model.reshape({model.input(0): [batch, *[dims[i].get_length() for i in range(1, dims.rank.get_length())]]})
            try:
                compiled = self.core.compile_model(model, "CPU", self.config)
            except RuntimeError as e:  # seen with the bf16 hint while oneDNN is held below the CPU (ONEDNN_MAX_CPU_ISA)
                raise CraftError(
                    f"OpenVINO could not compile {self.path} for batch {batch} with precision hint "
                    f"{self.config['INFERENCE_PRECISION_HINT']} on this CPU: {' '.join(str(e).split())[-200:]}; "
                    "try --precision fp32"
                ) from e
            self.requests[batch] = compiled.create_infer_request()
        return self.requests[batch]

    def prepare(self, batch: np.ndarray):
        self._request(len(batch))
        return batch

    def run(self, prepared: np.ndarray) -> np.ndarray:
        request = self._request(len(prepared))
        request.infer({0: prepared})
        return request.get_output_tensor(0).data.copy()

    @property
    def checks_reference(self) -> bool:
        return True

    def reference_check(self, images: np.ndarray) -> dict[str, Any] | None:
        import torch

        from craft_deploy.runtimes.onnx_session import onnx_logits
        from craft_deploy.runtimes.tolerance import compare_outputs, judge

        if not self.onnx_path.is_file():
            raise CraftError(f"{self.path}: the model.onnx it was converted from is missing beside it (its reference)")
        ref = onnx_logits(self.onnx_path, torch.from_numpy(images))
        check = compare_outputs(
            ref, np.concatenate([self.run(c) for c in np.array_split(images, -(-len(images) // 32))])
        )
        check["against"] = "the same file in ONNX Runtime (as export verified it against PyTorch)"
        check["passed"] = judge(check, "int8" if self.quantized else self.precision, None)
        return check

    def info(self) -> dict[str, Any]:
        ov = import_openvino()
        request = next(iter(self.requests.values()), None)
        compiled = request.get_compiled_model() if request is not None else None
        return {
            "openvino": ov.__version__,
            "device": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
            "threads": self.threads,
            "precision_hint": self.config["INFERENCE_PRECISION_HINT"],
            "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")) if compiled else None,
        }
