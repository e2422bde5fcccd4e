"""Compression recipes of a study grid, written as `+`-joined tokens in the `compress` command's own vocabulary.

    w8a8+mse+bn            --quant w8a8 --calib-method mse --bn-recalibrate
    2:4+sparsegpt+bn+w8a8  --sparsity 2:4 --prune-method sparsegpt --bn-recalibrate --quant w8a8
    w4a16+gptq             --quant w4a16 --weight-rounding gptq
    w7a8+ort-cpu           --quant w7a8 --placement ort-cpu
    w8a8+minmax+tensor     --quant w8a8 --calib-method minmax --weight-granularity tensor (the CrAFT paper's BasePTQ)
    rank0.25               --rank-ratio 0.25

Tokens are declared by the registered methods with their flags (craft_deploy.toolkit.flags): `wXaY` or `fp8`
(quantization), `N:M` or a ratio in (0, 1) (pruning), any registered pruning score (magnitude, wanda, sparsegpt, ...),
any registered calibrator (mse, minmax, ...), `bn` (BatchNorm re-estimation), `gptq` (GPTQ weight rounding), `tensor`
(one weight scale per tensor instead of per channel), `ort-cpu` (the ONNX Runtime CPU placement), `rankR` (low-rank
factorisation), and whatever a plugin's method declares. A recipe is turned into flags once, here: the study runs
`compress.from_flags(**flags)` and prints the same flags as the command that reproduces a cell, so the two cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError
from craft_deploy.config import parse_quant
from craft_deploy.toolkit.flags import Flag, Token
from craft_deploy.toolkit.registry import method_configs, method_flags


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


def _tokens() -> list[tuple[Token, Flag]]:
    """Every registered method's recipe tokens with the flag each sets, in the methods' order."""
    return [(tok, flag) for flag, _ in method_flags().values() for tok in flag.tokens]


def parse_recipe(text: str, calibrators: tuple[str, ...] = ("mse",)) -> list[Recipe]:
    """The recipes one grid entry stands for: one per calibrator when it quantizes and names none, else one."""
    tokens, registered = _tokens(), method_flags()
    flags: dict[str, Any] = {}

    def put(key: str, value: Any, token: str) -> None:
        if key in flags:
            raise CraftError(f"recipe {text!r}: {token!r} sets {key} a second time (already {flags[key]!r})")
        flags[key] = value

    for token in (t.strip().lower() for t in str(text).split("+")):
        if not token:
            raise CraftError(f"recipe {text!r} has an empty token; join tokens with single '+', e.g. w8a8+mse+bn")
        for tok, flag in tokens:
            matched, value = tok.match(token)
            if matched:
                put(flag.key, value, token)
                break
        else:
            raise CraftError(
                f"recipe {text!r}: unknown token {token!r}; accepted: " + ", ".join(t.describe() for t, _ in tokens)
            )
    configs = method_configs()
    if not any(cls.asked_for(flags) for cls in configs):
        verbs = [c.verb for c in configs if c.verb]
        examples = [_example(f) for c in configs for f in c.flags if f.key in c.trigger and f.tokens]
        raise CraftError(
            f"recipe {text!r} neither {', '.join(verbs[:-1])} nor {verbs[-1]}; add e.g. {', '.join(examples)}"
        )
    stray: dict[str, list[str]] = {}
    for key in flags:
        needs = registered[key][0].needs
        if needs and needs not in flags:
            stray.setdefault(needs, []).append(_word(key, flags[key]))
    for needs, words in stray.items():
        need = registered[needs][0]
        raise CraftError(f"recipe {text!r} names {', '.join(words)} without {need.what}; add e.g. {_example(need)}")
    if "quant" in flags and "calib_method" not in flags:  # the study's --calibrators fill in the calibrator
        variants = [{**flags, "calib_method": c} for c in calibrators]
    else:
        variants = [flags]
    return [_recipe(v) for v in variants]


def _example(flag: Flag) -> str:
    """A recipe word for `flag` to suggest in an error."""
    return flag.tokens[0].example or flag.first_example()


def _token_of(key: str) -> Token:
    return method_flags()[key][0].tokens[0]


def _word(key: str, value: Any) -> str:
    tok = _token_of(key)
    return tok.word(value) if tok.word else str(value)


def _recipe(flags: dict[str, Any]) -> Recipe:
    """Canonical token order, so that `bn+w8a8+mse` and `w8a8+mse+bn` are the same cell."""
    ordered = tuple(sorted(flags.items(), key=lambda kv: _token_of(kv[0]).position))
    return Recipe(name="+".join(_word(k, v) for k, v in ordered), flags=ordered)


def expand_grid(grid: tuple[str, ...], calibrators: tuple[str, ...]) -> list[Recipe]:
    """Every recipe of a grid, in grid order, each once."""
    seen: dict[str, Recipe] = {}
    for entry in grid:
        for r in parse_recipe(entry, calibrators):
            seen.setdefault(r.name, r)
    return list(seen.values())
