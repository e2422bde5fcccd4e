"""One-shot pruning by registered scores (magnitude, Wanda; `@register_prune_score` adds one); unstructured (per
layer, per row, global) or N:M; masks baked in.

Wanda (Sun et al., 2023) scores weight W_ij by |W_ij| * ||X_j||_2, the L2 norm of input feature j over the
calibration set; for convolutions feature j is an input channel (its norm over batch and space), shared by the
kernel taps of that channel. With `sequential`, statistics are gathered block by block on the partly pruned model,
so each block sees the output of the already pruned blocks before it (the Wanda reference's ViT procedure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.compress.lowrank import BN_RECALIBRATE
from craft_deploy.compress.sparsegpt import input_hessians
from craft_deploy.config import parse_sparsity
from craft_deploy.toolkit.batchnorm import recalibrate_batchnorm
from craft_deploy.toolkit.flags import Flag, Token
from craft_deploy.toolkit.layers import block_groups, select_layers
from craft_deploy.toolkit.primitives import as_input_groups, from_input_groups, nm_mask, row_mask, unstructured_mask
from craft_deploy.toolkit.registry import (
    CalibLoop,
    Method,
    MethodConfig,
    calibrate_with_hooks,
    name_registrar,
    register_method,
)

GRANULARITIES = ("layer", "row", "global")


class PruneScore:
    """A per-weight importance: the weights with the lowest scores are pruned. One registered subclass per
    `--prune-method`.

    Subclass it and decorate with `@register_prune_score("name")`: the name is then accepted by `--prune-method` and
    listed in its help. `score` gets the weight's |W| laid out as `as_input_groups` rows (the last axis is the input
    feature or input channel) and, when `needs_input_norms`, ||X_j||_2 of every input feature over the calibration
    set; it returns a score of the same shape.
    """

    name: str = ""
    needs_input_norms: bool = False
    centered_norms: bool = False  # the input norms with each feature's mean removed
    updates_weights: bool = False  # a solver (SparseGPT): `solve` prunes and updates the kept weights itself

    def score(self, magnitude: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def solve(self, mod: nn.Module, hessian: torch.Tensor, cfg: PruneConfig) -> None:
        """Prune `mod.weight` in place given its input Hessian (solvers only)."""
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return self.needs_input_norms or self.updates_weights


PRUNE_SCORES: dict[str, type[PruneScore]] = {}
register_prune_score = name_registrar(PRUNE_SCORES)
"""Class decorator adding a PruneScore subclass to PRUNE_SCORES under a `--prune-method` name."""


@register_prune_score("magnitude")
class Magnitude(PruneScore):
    """|W|."""

    def score(self, magnitude: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
        return magnitude


@register_prune_score("sparsegpt")
class SparseGPT(PruneScore):
    """SparseGPT: OBS saliency w^2 / [H^-1]_jj, and the kept weights updated to reconstruct the layer's outputs
    (see craft_deploy.compress.sparsegpt)."""

    updates_weights = True

    def solve(self, mod: nn.Module, hessian: torch.Tensor, cfg: PruneConfig) -> None:
        from craft_deploy.compress.sparsegpt import BLOCK_SIZE, from_weight_matrix, sparsegpt_prune, weight_matrix

        w = mod.weight
        block = BLOCK_SIZE if cfg.m is None else max(cfg.m, BLOCK_SIZE // cfg.m * cfg.m)
        new, _ = sparsegpt_prune(weight_matrix(w.detach()), hessian, cfg.n, cfg.m, cfg.ratio, block_size=block)
        w.copy_(from_weight_matrix(new.to(w.dtype), w))


@register_prune_score("wanda")
class Wanda(PruneScore):
    """Wanda: |W_ij| * ||X_j||_2."""

    needs_input_norms = True

    def score(self, magnitude: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
        return magnitude * input_norms.to(magnitude.dtype)[None, :]


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Pruning: `ratio` of the weights (unstructured) or N of every M along the input dimension."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None
    score: str = "magnitude"
    granularity: Literal["layer", "row", "global"] = "layer"
    sequential: bool = True
    bn_recalibrate: bool = False

    flags = (
        Flag(
            "sparsity",
            "Pruning: a ratio in (0, 1) such as 0.5, or N:M such as 2:4.",
            tokens=(
                Token(
                    "N:M or a ratio such as 0.5",
                    pattern=r"\d+:\d+|0?\.\d+",
                    value=lambda m, t: _checked(t),
                    position=10,
                ),
            ),
            example="2:4 or 0.5",
            what="a sparsity",
        ),
        Flag(
            "prune-method",
            "Weight score: |W|, Wanda's |W| * ||X_j|| from calibration activations, SparseGPT (OBS saliency, kept "
            "weights updated to reconstruct each layer's outputs), or a plugin's.",
            field="score",
            choices="craft_deploy.compress.prune:PRUNE_SCORES",
            needs="sparsity",
            tokens=(
                Token("a pruning score ({names})", registry="craft_deploy.compress.prune:PRUNE_SCORES", position=11),
            ),
        ),
        Flag(
            "granularity",
            "Where an unstructured ratio is applied: each layer, each output row, or all layers at once.",
            field="granularity",
            choices=GRANULARITIES,
        ),
        Flag(
            "sequential",
            "Wanda: gather statistics block by block on the partly pruned model.",
            field="sequential",
            kind="switch",
        ),
        BN_RECALIBRATE,
    )
    trigger = ("sparsity",)
    order = 20
    verb = "prunes"

    @classmethod
    def from_flags(cls, values: dict[str, Any], include: tuple[str, ...], exclude: tuple[str, ...]) -> PruneConfig:
        """`--sparsity 2:4` sets n and m, `--sparsity 0.5` the ratio; the rest are fields."""
        kind, value = parse_sparsity(values["sparsity"])
        pattern = {"n": value[0], "m": value[1]} if kind == "nm" else {"ratio": value}
        kw = cls.field_values(values)
        return cls(include=include, exclude=exclude, **kw, **pattern)

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.n is None):
            raise CraftError("give either a sparsity ratio (e.g. 0.5) or an N:M pattern (e.g. 2:4), not both")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise CraftError(f"--sparsity ratio must be in (0, 1), e.g. 0.5, got {self.ratio}")
        if self.n is not None and (self.m is None or not 0 < self.n < self.m):
            raise CraftError(f"--sparsity N:M needs 0 < N < M, got {self.n}:{self.m}; try --sparsity 2:4")
        if self.score not in PRUNE_SCORES:
            raise CraftError(f"--prune-method {self.score!r} is unknown; choose one of {', '.join(PRUNE_SCORES)}")
        if self.granularity not in GRANULARITIES:
            raise CraftError(f"--granularity {self.granularity!r} is unknown; choose one of {', '.join(GRANULARITIES)}")
        if PRUNE_SCORES[self.score].updates_weights and self.granularity != "layer":
            raise CraftError(
                f"--prune-method {self.score} chooses its mask layer by layer; drop --granularity {self.granularity}"
            )

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"unstructured {self.ratio:g}"

    @property
    def target(self) -> float:
        return 1 - self.n / self.m if self.n is not None else self.ratio

    @property
    def scorer(self) -> PruneScore:
        return PRUNE_SCORES[self.score]()

    @property
    def needs_data(self) -> bool:
        return self.scorer.needs_calibration or self.bn_recalibrate


def _input_feature_norms(
    model: nn.Module, layers: dict[str, nn.Module], calib: CalibLoop, centered: bool = False
) -> dict[str, torch.Tensor]:
    """||X_j||_2 over the calibration set for every input feature (Linear) or input channel (Conv) of `layers`; with
    `centered`, the norm of X_j minus its mean (sqrt(n) times the standard deviation)."""
    sums: dict[str, list] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = (
                x.transpose(0, 1).reshape(x.shape[1], -1)
                if isinstance(mod, nn.Conv2d)
                else x.reshape(-1, x.shape[-1]).T
            )
            stats = [x.pow(2).sum(1), x.sum(1), x.shape[1]]
            sums[name] = [a + b for a, b in zip(sums[name], stats)] if name in sums else stats

        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    calibrate_with_hooks(model, calib, handles)
    missing = set(layers) - set(sums)
    if missing:
        raise CraftError(f"calibration never reached layers {sorted(missing)[:3]}; cannot score them with Wanda")
    if not centered:
        return {name: sumsq.sqrt() for name, (sumsq, _, _) in sums.items()}
    return {name: (sumsq - total.pow(2) / n).clamp(min=0).sqrt() for name, (sumsq, total, n) in sums.items()}


def _score_rows(scorer: PruneScore, mod: nn.Module, norms: torch.Tensor | None) -> torch.Tensor:
    """Scores laid out like `as_input_groups(weight)`."""
    return scorer.score(as_input_groups(mod.weight.detach()).abs(), norms)


@torch.no_grad()
def prune(model: nn.Module, cfg: PruneConfig, calib: CalibLoop | None = None) -> dict[str, Any]:
    """Zero the lowest-scoring weights of every selected layer; returns the per-layer report."""
    if cfg.needs_data and calib is None:
        what = f"{cfg.score} pruning" if cfg.scorer.needs_calibration else "BatchNorm re-calibration"
        raise CraftError(f"{what} need calibration data: give --calib-samples N (images from the training split)")
    scorer = cfg.scorer
    layers, skipped = select_layers(model, cfg.include, cfg.exclude)
    report: dict[str, Any] = {
        "pattern": cfg.pattern,
        "score": cfg.score,
        "granularity": cfg.granularity,
        "layers": {},
        "skipped": dict(skipped),
    }
    for name, mod in list(layers.items()):
        dim = as_input_groups(mod.weight).shape[-1]
        if cfg.n is not None and dim % cfg.m:
            report["skipped"][name] = f"input dim {dim} is not a multiple of M={cfg.m}"
            del layers[name]
    if not layers:
        raise CraftError(f"no layer could be pruned with {cfg.pattern}: {report['skipped']}")

    def apply(name: str, keep: torch.Tensor) -> None:
        w = layers[name].weight
        w.copy_(from_input_groups(as_input_groups(w) * keep, w))
        record(name)

    def record(name: str) -> None:
        w = layers[name].weight
        report["layers"][name] = {
            "target": cfg.target,
            "achieved": float((w == 0).float().mean()),
            "shape": list(w.shape),
        }

    if cfg.granularity == "global" and cfg.n is None:
        norms = _input_feature_norms(model, layers, calib, scorer.centered_norms) if scorer.needs_input_norms else {}
        scores = {name: _score_rows(scorer, mod, norms.get(name)) for name, mod in layers.items()}
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(round(cfg.ratio * flat.numel()))
        threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
        for name, s in scores.items():
            apply(name, s > threshold)
        report["global_threshold"] = float(threshold)
    else:
        sequential = scorer.needs_calibration and cfg.sequential
        steps = block_groups(model, list(layers)) if sequential else [list(layers)]
        for group in tqdm(steps, desc=f"prune ({cfg.score})", unit="block", leave=False, disable=None):
            sub = {name: layers[name] for name in group}
            if scorer.updates_weights:
                hessians = input_hessians(model, sub, calib)
                for name, mod in sub.items():
                    scorer.solve(mod, hessians[name], cfg)
                    record(name)
                continue
            norms = _input_feature_norms(model, sub, calib, scorer.centered_norms) if scorer.needs_input_norms else {}
            for name, mod in sub.items():
                score = _score_rows(scorer, mod, norms.get(name))
                if cfg.n is not None:
                    keep = nm_mask(score, cfg.n, cfg.m)
                elif cfg.granularity == "row":
                    keep = as_input_groups(
                        row_mask(from_input_groups(score, mod.weight).flatten(1), cfg.ratio).reshape(mod.weight.shape)
                    )
                else:
                    keep = unstructured_mask(score, cfg.ratio)
                apply(name, keep)
        report["steps"] = len(steps)
    if cfg.bn_recalibrate:
        report["bn_recalibrated"] = recalibrate_batchnorm(model, calib)
    achieved = sparsity_report(model, report["layers"], cfg.n, cfg.m)
    report["model_zero_fraction"] = achieved["model_zero_fraction"]
    report["layers"] = achieved["layers"]
    report["summary"] = (
        f"pruned {cfg.pattern} ({cfg.score}): {len(report['layers'])} layers, {len(report['skipped'])} left dense, "
        f"{100 * report['model_zero_fraction']:.1f}% of all weights zero"
    )
    report["state"] = {
        "pattern": cfg.pattern,
        "score": cfg.score,
        "granularity": cfg.granularity,
        "layers": {n: cfg.pattern for n in report["layers"]},
    }
    return report


@register_method("prune", PruneConfig)
class Prune(Method):
    """One-shot pruning. Masks are baked into the weights (exact zeros), so restore changes no structure; it checks
    that every recorded layer is a Linear/Conv2d of the model."""

    def apply(self, model: nn.Module, cfg: PruneConfig, calib: CalibLoop | None) -> dict[str, Any]:
        return prune(model, cfg, calib)

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        layers = state.get("layers")
        if not isinstance(layers, dict) or not all(isinstance(p, str) for p in layers.values()):
            raise CraftError(f"prune state: layers must map layer names to their pattern, got {layers!r}"[:300])
        for name in layers:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise CraftError(f"prune state names layer {name!r}, which the model does not have") from None
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                raise CraftError(f"prune state names {name!r}, a {type(mod).__name__}, not a Linear/Conv2d layer")


def sparsity_report(model: nn.Module, layers: dict[str, Any], n: int | None, m: int | None) -> dict[str, Any]:
    """Achieved sparsity per pruned layer, N:M validity, and the whole model's fraction of zero weights."""
    total = zeros = 0
    for p in model.parameters():
        if p.ndim > 1:
            total += p.numel()
            zeros += int((p == 0).sum())
    out: dict[str, Any] = {"model_zero_fraction": zeros / max(total, 1), "layers": {}}
    for name, info in layers.items():
        w = model.get_submodule(name).weight
        row = dict(info, achieved=float((w == 0).float().mean()))
        if n is not None:
            zero_per_group = (as_input_groups(w) == 0).reshape(-1, m).sum(1)
            row["nm_valid"] = bool((zero_per_group >= m - n).all())
        out["layers"][name] = row
    return out


def _checked(token: str) -> str:
    parse_sparsity(token)  # refuses 4:2, 1.5, ...
    return token
