"""Frozen, validated configurations, one per stage; each round-trips through JSON with to_dict/from_dict."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError
from craft_deploy.toolkit.config_base import Config


def parse_sparsity(text: str | float | None) -> tuple[str, float | tuple[int, int]] | None:
    """'2:4' -> ('nm', (2, 4)); '0.5' -> ('unstructured', 0.5); with errors that say what is accepted."""
    if text is None or text == "":
        return None
    s = str(text).strip()
    if ":" in s:
        m = re.fullmatch(r"(\d+):(\d+)", s)
        if not m:
            raise CraftError(f"--sparsity {s!r} is not N:M; write it like 2:4 or 16:32")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            hint = f"; try --sparsity {mm}:{n}" if 0 < mm < n else ""
            raise CraftError(f"--sparsity N:M needs 0 < N < M, got {n}:{mm}{hint}")
        return "nm", (n, mm)
    try:
        ratio = float(s)
    except ValueError:
        raise CraftError(f"--sparsity {s!r} is neither a ratio in (0, 1) nor N:M such as 2:4") from None
    if not 0.0 < ratio < 1.0:
        raise CraftError(f"--sparsity ratio must be in (0, 1), e.g. 0.5, got {s}")
    return "unstructured", ratio


def parse_quant(text: str | None) -> tuple[int, int] | None:
    """'w8a8' -> (8, 8); 'w4a16' -> (4, 16) where 16 means activations stay in float."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"w(\d+)a(\d+)", str(text).strip().lower())
    if not m:
        raise CraftError(
            f"--quant {text!r} must look like wXaY (e.g. w8a8, w6a6, w4a16: weight and activation bits) or be fp8"
        )
    w, a = int(m.group(1)), int(m.group(2))
    if not 2 <= w <= 8:
        raise CraftError(f"--quant {text}: weight bits must be 2..8, got {w}")
    if not (2 <= a <= 8 or a == 16):
        raise CraftError(f"--quant {text}: activation bits must be 2..8, or 16 for float activations, got {a}")
    return w, a


TUNECOMP_PRUNE_SCHEDULES = ("cubic", "linear")  # see craft_deploy.finetune.tunecomp.Schedule.sparsity


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """Fine-tuning of a pretrained model on a downstream dataset."""

    model: str = "tf_efficientnet_lite0"
    data: str = "fashion-mnist"
    data_root: str | None = None
    pretrained: bool = True
    checkpoint: str | None = None
    optimizer: str = "adam"
    base: str = "adam"
    rho: float | None = None
    sam_every: int = 1
    cram_sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    cram_nm: str | None = None
    cram_plus: bool = False
    analyze: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 2
    batch_size: int = 32
    img_size: int = 64
    train_subset: int | None = None
    eval_subset: int | None = None
    warmup_steps: int = 50
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    amp: str | None = None
    grad_accum: int = 1
    device: str | None = None
    seed: int = 0
    threads: int | None = None
    init: str | None = None  # recovery: continue a compressed bundle with its compression kept
    teacher: str | None = None  # distil from this bundle (default with --init: the one it was compressed from)
    kd_temperature: float = 4.0
    kd_alpha: float = 1.0  # weight of the distillation term on top of the task loss; 0 = no distillation
    calib_samples: int = 256  # recovery: training images for the final BatchNorm re-estimation
    learn_scales: bool = False  # recovery: activation scales trained as in LSQ instead of frozen
    method: str | None = None  # tunecomp: fine-tune and compress jointly (finetune.tunecomp)
    rank_ratio: float | None = None  # tunecomp: rank = ratio x min(in, out) per factorised layer
    rank_energy: float | None = None  # tunecomp: or the smallest rank keeping this share of spectral energy
    rank_multiple: int = 1  # tunecomp: round each rank up to a multiple of this (8, 16: hardware-friendly widths)
    prune_ratio: float = 0.0  # tunecomp: share of each factor's entries pruned by the end of the transition
    transition: float = 0.5  # tunecomp: share of the run's steps over which the dense branch fades out
    reg_weight: float = 1.0  # tunecomp: initial weight of the student-vs-dense output regulariser (decays with a_t)
    prune_schedule: str = "cubic"  # tunecomp: how the factors' sparsity ramps to prune_ratio (cubic or linear)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cram_sparsities", tuple(float(v) for v in self.cram_sparsities))
        self._check_tunecomp()
        if self.rho is not None and self.rho <= 0:
            raise CraftError(f"--rho must be positive (SAM's neighbourhood radius, e.g. 0.05), got {self.rho}")
        if self.base not in ("adam", "sgd"):
            raise CraftError(f"--base must be adam or sgd, got {self.base!r}")
        if self.sam_every < 1:
            raise CraftError(
                f"--sam-every must be >= 1 (1 = a fresh SAM perturbation every step), got {self.sam_every}"
            )
        if not self.cram_sparsities or not all(0.0 < v < 1.0 for v in self.cram_sparsities):
            raise CraftError(
                f"--cram-sparsities must be ratios in (0, 1), e.g. 0.5,0.7,0.9, got {self.cram_sparsities}"
            )
        if self.cram_nm is not None and (parse_sparsity(self.cram_nm) or ("",))[0] != "nm":
            raise CraftError(f"--cram-nm must be an N:M pattern such as 2:4, got {self.cram_nm!r}")
        if self.lr <= 0:
            raise CraftError(f"--lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise CraftError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise CraftError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.img_size < 8:
            raise CraftError(f"--img-size must be at least 8 pixels, got {self.img_size}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise CraftError(f"--clip-grad must be a positive gradient norm, e.g. 1.0, got {self.clip_grad}")
        if self.amp not in (None, "bf16", "fp16"):
            raise CraftError(f"--amp must be bf16 or fp16 (mixed precision), got {self.amp!r}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise CraftError(
                f"--grad-accum {self.grad_accum} must be >= 1 and divide --batch-size {self.batch_size} "
                "(the batch is split into that many micro-batches)"
            )
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise CraftError(f"--device must be cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise CraftError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.kd_temperature <= 0 or self.kd_alpha < 0:
            raise CraftError(
                f"--kd-temperature must be > 0 and --kd-alpha >= 0 (0 = no distillation), got {self.kd_temperature} "
                f"and {self.kd_alpha}"
            )
        if self.learn_scales and self.init is None:
            raise CraftError("--learn-scales trains the activation scales of a quantized bundle: use it with --init")
        if self.init is not None and self.checkpoint is not None:
            raise CraftError("--init continues a compressed bundle; it cannot start from --checkpoint as well")
        if self.calib_samples < 1:
            raise CraftError(f"--calib-samples must be positive, got {self.calib_samples}")

    def _check_tunecomp(self) -> None:
        tunecomp_flags = (
            self.rank_ratio is not None or self.rank_energy is not None or self.prune_ratio > 0
            or self.prune_schedule != "cubic" or self.rank_multiple != 1
        )  # fmt: skip
        if self.method not in (None, "tunecomp"):
            raise CraftError(f"--method must be tunecomp (or left out for plain fine-tuning), got {self.method!r}")
        if self.method is None:
            if tunecomp_flags:
                raise CraftError(
                    "--rank-ratio, --rank-energy, --rank-multiple, --prune-ratio and --prune-schedule go with "
                    "--method tunecomp"
                )
            return
        if self.init is not None:
            raise CraftError("--method tunecomp starts from a pretrained model; it cannot continue --init as well")
        if (self.rank_ratio is None) == (self.rank_energy is None):
            raise CraftError("--method tunecomp needs exactly one of --rank-ratio R and --rank-energy E")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise CraftError(f"--prune-ratio must be in [0, 1), e.g. 0.6, got {self.prune_ratio}")
        if not 0.0 < self.transition < 1.0:
            raise CraftError(f"--transition must be in (0, 1) (a share of the training steps), got {self.transition}")
        if self.reg_weight < 0:
            raise CraftError(f"--reg-weight must be >= 0, got {self.reg_weight}")
        if self.prune_schedule not in TUNECOMP_PRUNE_SCHEDULES:
            raise CraftError(
                f"--prune-schedule must be one of {', '.join(TUNECOMP_PRUNE_SCHEDULES)}, got {self.prune_schedule!r}"
            )


@dataclass(frozen=True)
class CompressConfig(Config):
    """One-shot compression: the method configs themselves (each owns and validates its values), in the order they
    run, and the calibration data they share. `craft_deploy.compress.from_flags` builds one from the CLI's flags."""

    methods: tuple[Any, ...] = ()  # MethodConfig instances of registered methods (craft_deploy.toolkit.registry)
    calib_samples: int = 256
    eval_subset: int | None = None
    data_root: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods:
            raise CraftError("nothing to do: give --sparsity (e.g. 2:4) and/or --quant (e.g. w8a8)")
        if any(not hasattr(m, "method_name") for m in self.methods):
            raise CraftError(f"every compression method must be a registered method's config, got {self.methods!r}")
        if self.calib_samples <= 0:
            raise CraftError(f"--calib-samples must be positive, got {self.calib_samples}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        return {"methods": [{"method": m.method_name, "config": m.to_dict()} for m in self.methods], **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        from craft_deploy.toolkit.registry import method_named  # the registry knows the configs; imported on use

        if not isinstance(d, dict) or not isinstance(d.get("methods"), list):
            raise CraftError(f"CompressConfig must be an object with a list of methods, got {str(d)[:80]}")
        methods = []
        for entry in d["methods"]:
            if not isinstance(entry, dict) or set(entry) != {"method", "config"}:
                raise CraftError(f"CompressConfig.methods entries are {{method, config}}, got {str(entry)[:80]}")
            methods.append(method_named(entry["method"]).config_cls.from_dict(entry["config"]))
        return cls(methods=tuple(methods), **cls._checked({k: v for k, v in d.items() if k != "methods"}))


EXPORT_PRECISIONS = ("auto", "fp32", "fp16", "int8", "fp8")
# devices a package can be meant for (--format edge --device), with the compute capability (SM) of their GPU
EDGE_DEVICES = {
    "xavier": 7.2,
    "orin": 8.7,
    "thor": 11.0,
    "turing": 7.5,
    "ampere": 8.0,
    "ada": 8.9,
    "hopper": 9.0,
    "blackwell": 10.0,
}


@dataclass(frozen=True)
class ExportConfig(Config):
    """Export of a bundle to a deployable format, verified against PyTorch.

    `precision` auto is int8 (Q/DQ) for quantized bundles and fp32 otherwise. `target` picks the Q/DQ flavour:
    tensorrt = symmetric int8 activations (S8S8), ort-cpu = uint8 activations with zero point 128 (U8S8, exact).
    `opset` None is 17, or 21 when weights are INT4.
    """

    format: str = "onnx"  # a registered export target (craft_deploy.export.targets), checked by export.run
    precision: str = "auto"
    target: str = "tensorrt"
    opset: int | None = None
    verify_samples: int = 64
    data_root: str | None = None
    atol: float | None = None
    batch_sizes: tuple[int, ...] = (1, 16)
    sparse: bool = False
    workspace_gb: float = 4.0
    timing_cache: str | None = None
    device: str | None = None  # --format edge: the device the package is for (EDGE_DEVICES)

    def __post_init__(self) -> None:
        if self.device is not None and (self.format != "edge" or self.device not in EDGE_DEVICES):
            raise CraftError(
                f"--device {self.device!r} names the device of a package: use it with --format edge and one of "
                f"{', '.join(EDGE_DEVICES)}"
            )
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))  # JSON round trips give lists
        if self.precision not in EXPORT_PRECISIONS:
            raise CraftError(
                f"--precision {self.precision!r} is not supported; choose one of {', '.join(EXPORT_PRECISIONS)}"
            )
        from craft_deploy.toolkit.placement import PLACEMENTS  # Q/DQ flavours are the registered placements

        if self.target not in PLACEMENTS:
            raise CraftError(f"--target {self.target!r} is not supported; choose one of {', '.join(PLACEMENTS)}")
        if self.opset is not None and self.opset < 17:
            raise CraftError(f"--opset must be >= 17 (LayerNormalization, per-channel Q/DQ), got {self.opset}")
        if self.verify_samples <= 0:
            raise CraftError(f"--verify-samples must be positive, got {self.verify_samples}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CraftError(f"--batch-sizes must be positive integers, e.g. 1,16; got {self.batch_sizes}")
        if self.sparse and self.format != "tensorrt":
            raise CraftError("--sparse sets TensorRT's SPARSE_WEIGHTS flag: use it with --format tensorrt")
        if self.workspace_gb <= 0:
            raise CraftError(f"--workspace-gb must be positive, got {self.workspace_gb}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,16' -> (1, 16), every size positive."""
    try:
        sizes = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise CraftError(f"--batch-sizes {text!r} must be comma-separated integers, e.g. 1,16") from None
    if not sizes or any(b < 1 for b in sizes):
        raise CraftError(f"--batch-sizes {text!r}: every batch size must be a positive integer, e.g. 1,16")
    return sizes


@dataclass(frozen=True)
class BenchConfig(Config):
    """Accuracy and latency of a model on one backend."""

    backend: str = "ort-cpu"
    batch_sizes: tuple[int, ...] = (1, 16)
    data: str | None = None
    data_root: str | None = None
    eval_subset: int | None = None
    split: str = "test"
    warmup: int = 5
    iters: int = 30
    min_seconds: float = 0.5
    threads: int | None = None
    seed: int = 0
    max_cv: float = 0.10
    retries: int = 2
    rounds: int = 1  # > 1: time every (model, batch) in this many round-robin passes; p50 = median of the passes
    compile: bool = False
    precision: str = "fp32"  # pytorch backend: fp32, bf16 or fp16
    kernels: str | None = None  # pytorch backend: a name in bench.torch_kernels.TORCH_KERNELS (int8, fp8, sparse24)
    include_transfer: bool = False
    baseline: str | None = None
    max_latency_regression: float = 0.10
    max_accuracy_drop: float = 0.5
    update_baseline: bool = False
    against: str | None = None  # paired gate: the baseline artifact itself, timed beside the candidate
    min_blocks: int = 12
    max_blocks: int = 60
    confidence: float = 0.95

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if self.against and (self.baseline or self.update_baseline):
            raise CraftError(
                "--against (the baseline artifact, timed beside the candidate) and --baseline (a stored bench.json) "
                "are two gates: give one"
            )
        if not 2 <= self.min_blocks <= self.max_blocks:
            raise CraftError(
                f"--min-blocks and --max-blocks need 2 <= min <= max, got {self.min_blocks} and {self.max_blocks}"
            )
        if not 0.5 <= self.confidence < 1.0:
            raise CraftError(f"--confidence must be in [0.5, 1), e.g. 0.95, got {self.confidence}")
        if self.max_latency_regression < 0 or self.max_accuracy_drop < 0:
            raise CraftError(
                "--max-latency-regression (a fraction, e.g. 0.10) and --max-accuracy-drop (points, "
                f"e.g. 0.5) must be >= 0, got {self.max_latency_regression} and {self.max_accuracy_drop}"
            )
        if self.max_cv <= 0 or self.retries < 0:
            raise CraftError(f"--max-cv must be > 0 and --retries >= 0, got {self.max_cv} and {self.retries}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CraftError(f"--batch-sizes {self.batch_sizes}: every batch size must be a positive integer")
        if self.split not in ("val", "test"):
            raise CraftError(f"--split must be val or test, got {self.split!r}")
        if self.iters < 1 or self.warmup < 0:
            raise CraftError(f"--iters must be >= 1 and --warmup >= 0, got {self.iters} and {self.warmup}")
        if self.rounds < 1:
            raise CraftError(f"--rounds must be >= 1 (round-robin passes over the models), got {self.rounds}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise CraftError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if (self.kernels or self.compile) and self.backend != "pytorch":
            raise CraftError(
                f"--kernels and --compile apply to --backend pytorch only, not {self.backend!r} "
                "(an exported model's precision is chosen at export)"
            )
        if self.precision != "fp32" and self.backend not in ("pytorch", "openvino"):
            raise CraftError(
                f"--precision applies to --backend pytorch (the bundle's float precision) and openvino (its inference "
                f"precision hint), not {self.backend!r} (an exported model's precision is chosen at export)"
            )


@dataclass(frozen=True)
class AnalyzeConfig(Config):
    """Sharpness and structure diagnostics of a bundle."""

    data_root: str | None = None
    lambda_images: int = 64
    lambda_iters: int = 20
    lambda_tol: float = 1e-3
    lambda_batchnorm: str = "eval"
    calib_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lambda_batchnorm not in ("eval", "batch"):
            raise CraftError(f"--lambda-batchnorm must be eval or batch, got {self.lambda_batchnorm!r}")
        if self.lambda_images < 1 or self.lambda_iters < 1:
            raise CraftError(
                f"--lambda-images and --lambda-iters must be >= 1, got {self.lambda_images}, {self.lambda_iters}"
            )
        if self.calib_samples < 1:
            raise CraftError(f"--calib-samples must be positive, got {self.calib_samples}")


@dataclass(frozen=True)
class TuneConfig(Config):
    """A per-layer recipe for a bundle (craft_deploy.tune): the sensitivity of each layer to each treatment, then the
    most aggressive recipe whose top-1 drop stays within `max_drop` (validation images for the search, held-out test
    images for the check of its finalists)."""

    objective: str = "size"  # craft_deploy.tune.search.OBJECTIVES: size | sparse-share | latency
    max_drop: float = 1.0  # top-1 points the recipe may lose on the held-out test images
    margin: float = 0.25  # the search aims at max_drop - margin on the validation images
    searches: tuple[str, ...] = ()  # craft_deploy.tune.search.SEARCHES; () = the objective's (DEFAULT_SEARCHES)
    treatments: tuple[str, ...] = ()  # compress.recipe.parse_treatment tokens; () = the objective's
    calib_samples: int = 512  # training images: calibration, the KL score and the BatchNorm re-estimation (128 images
    # of re-estimation alone cost the demo bundle 1.1 points of validation top-1, 512 none: docs/tune.md)
    eval_subset: int | None = 2000  # validation images the search measures on, and held-out test images
    validate: int = 6  # (layer, treatment) pairs whose top-1 drop is measured: the highest scores and a few random
    prune_method: str = "magnitude"  # the score of the N:M treatment
    bn_recalibrate: bool = True  # BatchNorm statistics re-estimated once in every recipe the search measures
    analyze_only: bool = False
    backend: str = "ort-cpu"  # latency: the backend layers are priced and finalists timed on (tune.latency)
    latency_batch: int = 16  # latency: the batch size layers are priced at (finalists are timed at 1 and this)
    profile_runs: int = 50  # latency: profiled runs of each model when pricing layers
    rounds: int = 5  # latency: round-robin passes timing the finalists side by side
    min_speedup: float = 1.0  # latency: the chosen recipe's measured speed-up over the float model must reach this
    threads: int | None = None  # latency: intra-op threads of the backend (None: its default)
    data_root: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "treatments", tuple(self.treatments or ()))
        for flag, value in (("--latency-batch", self.latency_batch), ("--profile-runs", self.profile_runs),
                            ("--rounds", self.rounds)):  # fmt: skip
            if value < 1:
                raise CraftError(f"{flag} must be >= 1, got {value}")
        if self.min_speedup < 0:
            raise CraftError(
                f"--min-speedup must be >= 0 (a ratio to the float model's latency), got {self.min_speedup}"
            )
        if self.threads is not None and self.threads < 1:
            raise CraftError(f"--threads must be >= 1 (or left out for the backend's default), got {self.threads}")
        object.__setattr__(self, "searches", tuple(self.searches or ()))
        if self.calib_samples < 1:
            raise CraftError(f"--calib-samples must be positive, got {self.calib_samples}")
        if self.validate < 0:
            raise CraftError(f"--validate must be >= 0 (pairs checked on held-out images), got {self.validate}")
        if not 0.0 <= self.max_drop <= 100.0:
            raise CraftError(f"--max-drop must be top-1 points in [0, 100], e.g. 1.0, got {self.max_drop}")
        if not 0.0 <= self.margin <= self.max_drop:
            raise CraftError(f"--margin must be in [0, --max-drop {self.max_drop}], got {self.margin}")


STUDY_EXECUTORS = ("local", "ray")
STUDY_DEFAULT_GRID = (
    "w8a8",
    "w6a16",
    "w8a8+bn",
    "w7a8+ort-cpu+bn",
    "w6a6+bn",
    "w4a16+bn",
    "2:4+magnitude+bn",
    "2:4+sparsegpt+bn",
    "2:4+sparsegpt+bn+w8a8",
    "0.5+magnitude+bn",
    "0.7+magnitude+bn",
    "0.5+sparsegpt+bn",
    "0.7+sparsegpt+bn",
    "w6a6",
    "w4a16",
    "w4a8+bn",
    "w5a16+bn",
    "w4a16+bn+gptq",
    "w6a16+bn",
    "0.5+wanda+bn",
    "0.7+wanda+bn",
    "2:4+wanda+bn",
    "4:8+magnitude+bn",
    "4:8+sparsegpt+bn",
    "2:4+magnitude+bn+w8a8",
)  # fmt: skip  the order is the priority: --budget-minutes drops recipes from the end


@dataclass(frozen=True)
class StudyConfig(Config):
    """A grid of fine-tunings x seeds x compression recipes, run as resumable cells (craft_deploy.study).

    `optimizers` entries are `name` or `name:rho` (e.g. adam, sam:0.05, asam:1.0, cram); the first is the baseline
    the others are compared with. `grid` entries are recipes written as `+`-joined tokens (see
    craft_deploy.study.recipes); a recipe with --quant and no calibrator runs once per entry of `calibrators`.
    `finetune` holds FinetuneConfig fields shared by every fine-tuning (e.g. epochs, train_subset).
    """

    model: str = "tf_efficientnet_lite0"
    data: str = "fashion-mnist"
    data_root: str | None = None
    pretrained: bool = True
    optimizers: tuple[str, ...] = ("adam", "sam:0.05", "sam:0.5")
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune: dict | None = None
    eval_subset: int | None = 2000
    calib_samples: int = 512
    grid: tuple[str, ...] = STUDY_DEFAULT_GRID
    calibrators: tuple[str, ...] = ("mse",)
    analyze: bool = True
    lambda_images: int = 64
    lambda_iters: int = 20
    recover_worst: int = 2
    recover: tuple[str, ...] = ()  # grid recipes recovered in any case, besides the recover_worst worst ones
    recover_epochs: int = 1
    tunecomp: tuple[float, ...] = (0.25,)
    tunecomp_prune: float = 0.0
    backends: tuple[str, ...] = ("ort-cpu",)  # registered backends, or name@precision (openvino@bf16)
    batch_sizes: tuple[int, ...] = (1, 16)
    bench_seconds: float = 0.5  # minimum timing per batch size of each deployed cell (BenchConfig.min_seconds)
    speed_rounds: int = 5  # round-robin passes over one deployed model per recipe (0: none; latency from the cells)
    max_drop: float = 1.0
    budget_minutes: float | None = None
    jobs: int = 1
    executor: str = "local"
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("optimizers", "seeds", "grid", "calibrators", "tunecomp", "backends", "batch_sizes", "recover"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.finetune is not None and not isinstance(self.finetune, dict):
            raise CraftError(f"study `finetune:` must map FinetuneConfig fields to values, got {self.finetune!r}")
        object.__setattr__(self, "finetune", dict(self.finetune or {}))
        if not self.optimizers or not self.seeds:
            raise CraftError(
                "a study needs at least one optimizer (--optimizers adam,sam:0.05) and one seed (--seeds 0)"
            )
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.optimizers)) != len(self.optimizers):
            raise CraftError(f"--seeds and --optimizers must not repeat, got {self.seeds} and {self.optimizers}")
        owned = {"model", "data", "data_root", "pretrained", "optimizer", "rho", "seed", "eval_subset", "threads",
                 "device", "init", "method", "rank_ratio", "rank_energy", "rank_multiple", "prune_ratio",
                 "prune_schedule", "checkpoint", "teacher"}  # fmt: skip
        clash = sorted(set(self.finetune) & owned)
        if clash:
            raise CraftError(f"study finetune settings {clash} are set by the study itself (its own keys, --seeds, "
                             "--optimizers, --tunecomp); remove them from `finetune:`")  # fmt: skip
        FinetuneConfig.from_dict({**self.finetune, "model": self.model, "data": self.data})  # validates every value
        if self.executor not in STUDY_EXECUTORS:
            raise CraftError(
                f"--executor {self.executor!r} is not supported; choose one of {', '.join(STUDY_EXECUTORS)}"
            )
        if self.jobs < 1 or (self.threads is not None and self.threads < 1):
            raise CraftError(f"--jobs and --threads must be >= 1, got {self.jobs} and {self.threads}")
        if self.max_drop < 0:
            raise CraftError(f"--max-drop is an accuracy budget in points (e.g. 1.0), got {self.max_drop}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise CraftError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.eval_subset is not None and self.eval_subset < 1 or self.calib_samples < 1:
            raise CraftError(
                f"eval_subset and calib_samples must be positive, got {self.eval_subset}, {self.calib_samples}"
            )
        if self.recover_worst < 0 or self.recover_epochs < 1:
            raise CraftError(f"recover_worst must be >= 0 and recover_epochs >= 1, got {self.recover_worst}, "
                             f"{self.recover_epochs}")  # fmt: skip
        if any(not 0 < r <= 1 for r in self.tunecomp) or not 0 <= self.tunecomp_prune < 1:
            raise CraftError(f"--tunecomp rank ratios must be in (0, 1] and tunecomp_prune in [0, 1), got "
                             f"{self.tunecomp} and {self.tunecomp_prune}")  # fmt: skip
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CraftError(f"--batch-sizes must be positive integers, e.g. 1,16; got {self.batch_sizes}")
        if not self.calibrators:
            raise CraftError("calibrators must name at least one calibrator, e.g. mse")
        if self.speed_rounds < 0:
            raise CraftError(
                f"speed_rounds must be >= 0 (round-robin passes; 0 turns them off), got {self.speed_rounds}"
            )
        if self.bench_seconds <= 0:
            raise CraftError(
                f"bench_seconds must be positive (seconds of timing per batch size), got {self.bench_seconds}"
            )
