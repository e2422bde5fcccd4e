"""Typed per-tensor quantization specs: what a bundle's manifest records for each quantized layer, attention matmul and
block tensor, read back with one set of defaults and validated before anything is built from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError

FLOAT_BITS = 16  # a_bits 16: the activation stays in float (weight-only quantization)
TWIN_MODES = (None, "gelu", "softmax")
TENSOR_SIDES = ("input", "output")


def _bits(value: Any, what: str, allow_float: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (2 <= value <= 8 or (allow_float and value == 16)):
        accepted = "2..8 or 16 (float)" if allow_float else "2..8"
        raise CraftError(f"quantization spec: {what} must be an integer in {accepted}, got {value!r}")
    return value


def _format(value: Any) -> str:
    if value not in ("int", "fp8"):
        raise CraftError(f"quantization spec: number_format must be int or fp8, got {value!r}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise CraftError(f"quantization spec: {what} must be true or false, got {value!r}")
    return value


class _Spec:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = ""):
        if not isinstance(d, dict):
            raise CraftError(f"quantization spec{where} must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CraftError(f"quantization spec{where} has unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**d)
        except CraftError as e:
            raise CraftError(f"{e}{where}") from None


@dataclass(frozen=True)
class LayerQuantSpec(_Spec):
    """A Conv/Linear layer: its weight's grid and granularity, and its input's (a_bits 16 = float input)."""

    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "channel"
    group_size: int = 0
    a_symmetric: bool = True
    a_twin: str | None = None
    number_format: str = "int"  # int (integer grids) or fp8 (E4M3 weights and inputs, 8 bits)

    def __post_init__(self) -> None:
        _format(self.number_format)
        if self.number_format == "fp8" and (
            self.w_bits != 8 or self.a_bits not in (8, FLOAT_BITS) or not self.a_symmetric or self.a_twin
        ):
            raise CraftError(
                "quantization spec: fp8 is E4M3 weights (w_bits 8) and symmetric E4M3 or float inputs (a_bits 8 or "
                f"16), got w_bits {self.w_bits}, a_bits {self.a_bits}, a_symmetric {self.a_symmetric}"
            )
        if self.number_format == "fp8" and self.w_granularity == "group":
            raise CraftError("quantization spec: fp8 weights are per channel or per tensor, not per group")
        _bits(self.w_bits, "w_bits", allow_float=False)
        _bits(self.a_bits, "a_bits", allow_float=True)
        _flag(self.a_symmetric, "a_symmetric")
        if self.w_granularity not in ("channel", "tensor", "group"):
            raise CraftError(
                f"quantization spec: w_granularity must be channel, tensor or group, got {self.w_granularity!r}"
            )
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not 0 <= self.group_size <= 2**20
        ):
            raise CraftError(f"quantization spec: group_size must be an integer in 0..1048576, got {self.group_size!r}")
        if (self.w_granularity == "group") != (self.group_size > 0):
            raise CraftError(f"quantization spec: group_size {self.group_size} goes with w_granularity group only")
        if self.a_twin not in TWIN_MODES:
            raise CraftError(f"quantization spec: a_twin must be null, gelu or softmax, got {self.a_twin!r}")

    @property
    def quantizes_input(self) -> bool:
        return self.a_bits < FLOAT_BITS


@dataclass(frozen=True)
class MatMulQuantSpec(_Spec):
    """A ViT attention block's two matmuls (Q K^T and softmax x V): their inputs' grid."""

    a_bits: int = 8
    a_symmetric: bool = True
    probs_twin: bool = False
    number_format: str = "int"

    def __post_init__(self) -> None:
        _format(self.number_format)
        if self.number_format == "fp8" and (self.probs_twin or not self.a_symmetric):
            raise CraftError("quantization spec: fp8 attention matmuls are symmetric and single-scale")
        _bits(self.a_bits, "a_bits", allow_float=False)
        _flag(self.a_symmetric, "a_symmetric")
        _flag(self.probs_twin, "probs_twin")


@dataclass(frozen=True)
class TensorQuantSpec(_Spec):
    """Quantizers on any module's input and/or output (ONNX Runtime's CPU placement: residual adds, pooling)."""

    a_bits: int = 8
    a_symmetric: bool = False
    sides: tuple[str, ...] = ("output",)

    def __post_init__(self) -> None:
        _bits(self.a_bits, "a_bits", allow_float=False)
        _flag(self.a_symmetric, "a_symmetric")
        if (
            not isinstance(self.sides, (list, tuple))
            or not self.sides
            or any(s not in TENSOR_SIDES for s in self.sides)
        ):
            raise CraftError(f"quantization spec: sides must be a non-empty list of input/output, got {self.sides!r}")
        object.__setattr__(self, "sides", tuple(self.sides))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sides": list(self.sides)}


def read_specs(table: Any, cls: type[_Spec], what: str) -> dict[str, Any]:
    """`{module name: spec dict}` from a manifest into `{module name: typed spec}`."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise CraftError(f"quantization {what} must be an object of module name -> spec, got {type(table).__name__}")
    return {name: cls.from_dict(d, f" of {what} {name!r}") for name, d in table.items()}


def quant_specs(
    state: dict[str, Any],
) -> tuple[dict[str, LayerQuantSpec], dict[str, MatMulQuantSpec], dict[str, TensorQuantSpec]]:
    """The typed layer, matmul and tensor specs of a quantize state read from a manifest (validated)."""
    return (
        read_specs(state.get("layers"), LayerQuantSpec, "layer"),
        read_specs(state.get("matmuls"), MatMulQuantSpec, "matmul"),
        read_specs(state.get("tensors"), TensorQuantSpec, "tensor"),
    )
