"""Real low-precision kernels for a bundle's Linear layers in PyTorch: INT8 (`torch._int_mm`), FP8 E4M3
(`torch._scaled_mm`, Hopper and Ada GPUs) and 2:4 semi-structured sparsity (cuSPARSELt through
`torch.sparse.to_sparse_semi_structured`).

A compressed bundle simulates its compression with fake-quant; these kernels run it. Each takes the bundle's *float*
weights (the quantizers are stripped first) and quantizes them itself:
- weights: symmetric per output channel, scale = absmax / qmax (127 for INT8, 448 for E4M3);
- activations: dynamic and per token (one scale per row of the flattened input, from that row's absmax), the scheme of
  torchao's int8-dynamic and float8-rowwise configs. Dynamic per-token scales need no calibration and are at least as
  fine as the bundle's static per-tensor ones, so the kernels' logits differ from the fake-quant bundle's by about one
  rounding step; `bench` holds them to the INT8 tolerance policy (top-1 agreement) against the fake-quant bundle.
- 2:4: the bundle's own zeros (its N:M groups run along input features, as cuSPARSELt wants them along a weight row);
  a layer whose weights are not 2:4 is refused, not re-pruned.

Only Linear layers are converted (a ViT's qkv/proj/fc1/fc2); convs and attention matmuls stay in the model's float
precision. Shapes the kernels cannot take are skipped and reported per layer (`_int_mm` needs in/out features that
are multiples of 8, `_scaled_mm` of 16, cuSPARSELt of 64 and 2:4 weights); `_int_mm` needs more than 16 rows, so
smaller inputs are padded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from craft_deploy import CraftError
from craft_deploy.toolkit.layers import replace_module
from craft_deploy.toolkit.registry import name_registrar

TORCH_KERNELS: dict[str, type[KernelRecipe]] = {}
register_torch_kernel = name_registrar(TORCH_KERNELS)
"""Class decorator adding a kernel recipe to TORCH_KERNELS under a name."""

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class KernelRecipe:
    """Replaces the Linear layers it can take with modules running one kind of kernel."""

    help = ""
    # the float dtype the converted model must run in (None: any)
    needs_dtype: torch.dtype | None = None
    # the module a Linear becomes, and what its in/out features must be multiples of
    module: type[nn.Module] | None = None
    multiple: int = 1

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        return True, ""

    def unsupported(self, name: str, mod: nn.Linear) -> str | None:
        """Why this layer cannot be converted (None: it can)."""
        return _multiple_of(mod, self.multiple)

    def convert(self, mod: nn.Linear, dtype: torch.dtype) -> nn.Module:
        return self.module(mod)


def _per_row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    return x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / qmax


class _DynamicLinear(nn.Module):
    """y = (q(x) q(W)^T) * s_x * s_w + b: weights quantized once per output channel, inputs per row at run time."""

    QMAX = 1.0

    def __init__(self, mod: nn.Linear):
        super().__init__()
        w = mod.weight.detach().float()
        scale = _per_row_scale(w, self.QMAX)
        self.register_buffer("w_t", self.quantize(w, scale).t())  # column-major (K, N), as the GEMMs want it
        self.register_buffer("w_scale", scale.reshape(1, -1))
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float(), requires_grad=False)
        self.out_features = mod.out_features

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(rows, N) float32 of quantized rows `q` with per-row scales `s`, the weight scales applied."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        s = _per_row_scale(rows, self.QMAX)
        y = self.matmul(self.quantize(rows.float(), s), s)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8DynamicLinear(_DynamicLinear):
    """INT8 operands, INT32 accumulation (`torch._int_mm`)."""

    QMAX = 127.0
    MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8)

    def matmul(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        if n < self.MIN_ROWS:
            q = F.pad(q, (0, 0, 0, self.MIN_ROWS - n))
        return torch._int_mm(q, self.w_t)[:n].float() * s * self.w_scale


class Fp8DynamicLinear(_DynamicLinear):
    """E4M3 operands (`torch._scaled_mm` with row-wise scales, bf16 output)."""

    QMAX = 448.0

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)

    def matmul(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(q, self.w_t, scale_a=s, scale_b=self.w_scale, out_dtype=torch.bfloat16).float()


def _multiple_of(mod: nn.Linear, k: int) -> str | None:
    if mod.in_features % k or mod.out_features % k:
        return f"in/out features {mod.in_features}/{mod.out_features} are not multiples of {k}"
    return None


def int8_gemm_is_exact() -> bool:
    """Whether this CPU's `torch._int_mm` adds int8 products exactly. oneDNN's int8 GEMM on x86 without VNNI (AVX2
    only, or oneDNN held there with ONEDNN_MAX_CPU_ISA) adds pairs of u8 x s8 products in 16 bits with saturation, as
    ONNX Runtime's kernels do (docs/cpu-speed.md): 127 x 127 over 64 rows then comes out wrong. Probed, not assumed."""
    a = torch.full((17, 64), 127, dtype=torch.int8)
    b = torch.full((64, 8), 127, dtype=torch.int8)
    return bool((torch._int_mm(a, b) == 64 * 127 * 127).all())


@register_torch_kernel("int8")
class Int8Kernel(KernelRecipe):
    help = "INT8 weights (per channel) and dynamic per-token INT8 activations, torch._int_mm"
    module, multiple = Int8DynamicLinear, 8

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        if device == "cpu" and not int8_gemm_is_exact():
            return False, (
                "this CPU's int8 GEMM (oneDNN without VNNI) saturates pairs of 8-bit products, so torch._int_mm "
                "would compute another model; run it on a CPU with VNNI or AMX, or on a CUDA GPU"
            )
        return True, ""


@register_torch_kernel("fp8")
class Fp8Kernel(KernelRecipe):
    help = "FP8 E4M3 weights (per channel) and dynamic per-token FP8 activations, torch._scaled_mm (SM 8.9+)"
    module, multiple = Fp8DynamicLinear, 16

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        if device.startswith("cuda") and torch.cuda.get_device_capability() < (8, 9):
            name = torch.cuda.get_device_name()
            return False, f"FP8 matmuls need an Ada or Hopper GPU (SM 8.9+); {name} is not one (use --kernels int8)"
        return True, ""


@register_torch_kernel("sparse24")
class Sparse24Kernel(KernelRecipe):
    help = "2:4 semi-structured sparse weights (the bundle's own zeros), cuSPARSELt; needs --precision bf16 or fp16"
    needs_dtype = torch.bfloat16

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        if not device.startswith("cuda"):
            return False, "2:4 semi-structured kernels run on CUDA GPUs only (cuSPARSELt or CUTLASS)"
        if torch.cuda.get_device_capability() < (8, 0):
            return False, f"2:4 sparse tensor cores need an Ampere or newer GPU, not {torch.cuda.get_device_name()}"
        return True, ""

    def unsupported(self, name: str, mod: nn.Linear) -> str | None:
        why = _multiple_of(mod, 64)
        if why:
            return why
        if not is_two_four(mod.weight):
            return "weights are not 2:4 sparse along input features (compress with --sparsity 2:4 first)"
        return None

    def convert(self, mod: nn.Linear, dtype: torch.dtype) -> nn.Module:
        from torch.sparse import to_sparse_semi_structured

        out = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=mod.weight.device)
        out.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach().to(dtype)), requires_grad=False)
        if mod.bias is not None:
            out.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        return out


def is_two_four(w: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input features of every row."""
    if w.shape[-1] % 4:
        return False
    return bool(((w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def strip_quantizers(model: nn.Module) -> int:
    """Remove every fake-quant quantizer of a compressed bundle's model in place, leaving its float weights (the
    parametrizations' originals) and float activations; pruning zeros stay. Returns how many were removed."""
    from craft_deploy.toolkit.attention import Attention, QuantAttention
    from craft_deploy.toolkit.qmodules import quantize_input, quantize_output

    removed = 0
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            removed += 1
        for hooks, fn, attr in (
            (mod._forward_pre_hooks, quantize_input, "input_quantizer"),
            (mod._forward_hooks, quantize_output, "output_quantizer"),
        ):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                removed += 1
            if hasattr(mod, attr):
                delattr(mod, attr)
        if isinstance(mod, QuantAttention):
            del mod.qk_matmul, mod.av_matmul
            mod.__class__ = Attention
            removed += 1
    return removed


def apply_kernels(model: nn.Module, kernel: str, dtype: torch.dtype, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Replace the Linear layers `kernel` can take (all but `exclude`) with kernel modules, in place; returns
    {"converted": [names], "skipped": {name: why}}."""
    if kernel not in TORCH_KERNELS:
        raise CraftError(f"unknown kernel {kernel!r}; registered: {', '.join(TORCH_KERNELS)}")
    recipe = TORCH_KERNELS[kernel]()
    converted, skipped = [], {}
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        why = "excluded" if name in exclude else recipe.unsupported(name, mod)
        if why:
            skipped[name] = why
            continue
        replace_module(model, name, recipe.convert(mod, dtype))
        converted.append(name)
    if not converted:
        raise CraftError(
            f"--kernels {kernel}: no Linear layer of this model can take it ({len(skipped)} skipped: "
            + "; ".join(f"{n}: {w}" for n, w in list(skipped.items())[:3])
            + ")"
        )
    return {"kernel": kernel, "converted": converted, "skipped": skipped}


def kernel_model(model: nn.Module, kernel: str | None, precision: str, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """Make a bundle's `model` ready to run, in place: quantizers stripped and Linear layers converted when `kernel`
    is set, cast to `precision`, on `device`. Returns it and what was done.

    In place, not on a copy: removing a parametrization edits the class that torch made for the parametrized module,
    and a deep copy shares that class with its original, so stripping a copy would break the original."""
    if precision not in PRECISIONS:
        raise CraftError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    info: dict[str, Any] = {"precision": precision}
    if kernel is None:
        if dtype != torch.float32 and _has_quantizers(model):
            raise CraftError(
                f"--precision {precision}: this bundle is fake-quantized and its quantizers compute in fp32; bench it "
                "in fp32, or with --kernels int8/fp8 (real low-precision kernels), or bench the float bundle it was "
                f"compressed from with --precision {precision}"
            )
        return model.to(device=device, dtype=dtype).eval(), info
    if kernel not in TORCH_KERNELS:
        raise CraftError(f"unknown --kernels {kernel!r}; registered: {', '.join(TORCH_KERNELS)}")
    recipe = TORCH_KERNELS[kernel]
    ok, why = recipe.availability(device)
    if not ok:
        raise CraftError(f"--kernels {kernel}: {why}")
    if recipe.needs_dtype is not None and dtype == torch.float32:
        raise CraftError(f"--kernels {kernel} runs in bf16 or fp16: add --precision bf16")
    info["quantizers_stripped"] = strip_quantizers(model.eval())
    model = model.to(device=device, dtype=dtype)
    info.update(apply_kernels(model, kernel, dtype, exclude=_head_names(model)))
    return model.eval(), info


def _has_quantizers(model: nn.Module) -> bool:
    from craft_deploy.toolkit.qmodules import activation_quantizers, quantized_layers

    return bool(quantized_layers(model) or activation_quantizers(model))


def _head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier, kept in float precision like every method's default exclusion of the head."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return tuple(n for n, m in model.named_modules() if m is head)
