"""Compression recipes of a study grid, written as `+`-joined tokens in the `compress` command's own vocabulary.

    w8a8+mse+bn            --quant w8a8 --calib-method mse --bn-recalibrate
    2:4+sparsegpt+bn+w8a8  --sparsity 2:4 --prune-method sparsegpt --bn-recalibrate --quant w8a8
    w4a16+gptq             --quant w4a16 --weight-rounding gptq
    w7a8+ort-cpu           --quant w7a8 --placement ort-cpu
    w8a8+minmax+tensor     --quant w8a8 --calib-method minmax --weight-granularity tensor (the CrAFT paper's BasePTQ)
    rank0.25               --rank-ratio 0.25

Tokens: `wXaY` or `fp8` (quantization), `N:M` or a ratio in (0, 1) (pruning), any registered pruning score
(magnitude, wanda, sparsegpt, ...), any registered calibrator (mse, minmax, ...), `bn` (BatchNorm re-estimation),
`gptq` (GPTQ weight rounding), `tensor` (one weight scale per tensor instead of per channel), `ort-cpu` (the ONNX
Runtime CPU placement), `rankR` (low-rank factorisation). A recipe is turned into flags once, here: the study runs
`compress.from_flags(**flags)` and prints the same flags as the command that reproduces a cell, so the two cannot
drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError
from craft_deploy.config import parse_quant, parse_sparsity

_TOKEN_HELP = (
    "wXaY or fp8, N:M or a ratio such as 0.5, a pruning score ({scores}), a calibrator ({calibrators}), bn, gptq, "
    "tensor, ort-cpu, rankR (e.g. rank0.25)"
)


@dataclass(frozen=True)
class Recipe:
    """One compression of a study grid: its canonical name and the `compress` flags (from_flags keyword arguments)."""

    name: str
    flags: tuple[tuple[str, Any], ...]

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.flags)

    @property
    def quant(self) -> tuple[int, int] | None:
        q = self.kwargs.get("quant")
        return None if q is None else (8, 8) if q == "fp8" else parse_quant(q)

    @property
    def sparsity(self) -> str | None:
        return self.kwargs.get("sparsity")

    @property
    def solver(self) -> bool:
        """Whether a Hessian solver (SparseGPT, GPTQ) runs: such cells take several times longer."""
        kw = self.kwargs
        return kw.get("prune_method") == "sparsegpt" or kw.get("weight_rounding") == "gptq"

    def cli_flags(self) -> list[str]:
        """The `craft-deploy compress` flags of this recipe, in a stable order."""
        out: list[str] = []
        for key, value in self.flags:
            flag = "--" + key.replace("_", "-")
            out += [flag] if value is True else [flag, str(value)]
        return out

    def deployable_on_integer_kernels(self) -> bool:
        """Whether an export runs this recipe as it was measured: float models, and 8-bit activations with 7- or 8-bit
        weights (Q/DQ INT8 or FP8). Weight-only (A16) and sub-7-bit weights are simulated here: the ONNX export holds
        INT4 weights only for MatMul/Gemm and no integer kernel runs 5/6-bit weights, so they are not deployed."""
        q = self.quant
        return q is None or (q[1] == 8 and q[0] >= 7)


def _registered(table: str) -> dict[str, Any]:
    if table == "scores":
        from craft_deploy.compress.prune import PRUNE_SCORES

        return PRUNE_SCORES
    from craft_deploy.toolkit.calibrators import CALIBRATORS

    return CALIBRATORS


def parse_recipe(text: str, calibrators: tuple[str, ...] = ("mse",)) -> list[Recipe]:
    """The recipes one grid entry stands for: one per calibrator when it quantizes and names none, else one."""
    scores, calibs = _registered("scores"), _registered("calibrators")
    flags: dict[str, Any] = {}

    def put(key: str, value: Any, token: str) -> None:
        if key in flags:
            raise CraftError(f"recipe {text!r}: {token!r} sets {key} a second time (already {flags[key]!r})")
        flags[key] = value

    tokens = [t.strip().lower() for t in str(text).split("+")]
    for token in tokens:
        if not token:
            raise CraftError(f"recipe {text!r} has an empty token; join tokens with single '+', e.g. w8a8+mse+bn")
        if token == "fp8" or re.fullmatch(r"w\d+a\d+", token):
            parse_quant(token) if token != "fp8" else None  # validates the bits
            put("quant", token, token)
        elif re.fullmatch(r"\d+:\d+", token) or re.fullmatch(r"0?\.\d+", token):
            parse_sparsity(token)
            put("sparsity", token, token)
        elif token in scores:
            put("prune_method", token, token)
        elif token in calibs:
            put("calib_method", token, token)
        elif token == "bn":
            put("bn_recalibrate", True, token)
        elif token == "gptq":
            put("weight_rounding", "gptq", token)
        elif token == "tensor":
            put("weight_granularity", "tensor", token)
        elif token == "ort-cpu":
            put("placement", "ort-cpu", token)
        elif m := re.fullmatch(r"rank(0?\.\d+|1(\.0*)?)", token):
            put("rank_ratio", float(m.group(1)), token)
        else:
            raise CraftError(
                f"recipe {text!r}: unknown token {token!r}; accepted: "
                + _TOKEN_HELP.format(scores=", ".join(scores), calibrators=", ".join(calibs))
            )
    if not {"quant", "sparsity", "rank_ratio"} & set(flags):
        raise CraftError(f"recipe {text!r} neither quantizes, prunes nor factorises; add e.g. w8a8, 2:4 or rank0.25")
    if "prune_method" in flags and "sparsity" not in flags:
        raise CraftError(f"recipe {text!r} names a pruning score without a sparsity; add e.g. 2:4 or 0.5")
    if "quant" not in flags and {"calib_method", "weight_rounding", "placement", "weight_granularity"} & set(flags):
        raise CraftError(
            f"recipe {text!r} names a calibrator, gptq, tensor or ort-cpu without quantizing; add e.g. w8a8"
        )
    if "quant" in flags and "calib_method" not in flags:
        variants = [{**flags, "calib_method": c} for c in calibrators]
    else:
        variants = [flags]
    return [_recipe(v) for v in variants]


_ORDER = ("rank_ratio", "sparsity", "prune_method", "quant", "calib_method", "weight_granularity", "weight_rounding",
          "placement", "bn_recalibrate")  # fmt: skip


def _recipe(flags: dict[str, Any]) -> Recipe:
    """Canonical token order, so that `bn+w8a8+mse` and `w8a8+mse+bn` are the same cell."""
    ordered = tuple((k, flags[k]) for k in _ORDER if k in flags)
    words = {
        "rank_ratio": lambda v: f"rank{v:g}",
        "bn_recalibrate": lambda v: "bn",
        "weight_rounding": lambda v: v,
        "weight_granularity": lambda v: v,
        "placement": lambda v: v,
    }
    name = "+".join(words.get(k, str)(v) for k, v in ordered)
    return Recipe(name=name, flags=ordered)


def expand_grid(grid: tuple[str, ...], calibrators: tuple[str, ...]) -> list[Recipe]:
    """Every recipe of a grid, in grid order, each once."""
    seen: dict[str, Recipe] = {}
    for entry in grid:
        for r in parse_recipe(entry, calibrators):
            seen.setdefault(r.name, r)
    return list(seen.values())
