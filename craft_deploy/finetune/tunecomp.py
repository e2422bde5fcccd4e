"""TuneComp (Chen et al., MERL 2025): fine-tune and compress in one run, moving each linear map over channels (Linear
layers, 1x1 convs) from its pretrained weights to a pruned low-rank student while the model learns the task.

Per compressed layer: `Y = a_t (W0 X + b0) + a'_t (B A X + b)`, W0 and b0 frozen, B A the trainable student
(initialised activation-aware, `compress.lowrank`), `a_t = 1 - sin(pi t / 2T)` for t <= T and 0 after, and
`a'_t = sqrt(1 - a_t^2)`; after T the dense branch is gone and the saved bundle holds only the factors. Everything else
in the model (3x3 and depthwise convs, norms, head) fine-tunes as usual, with any optimizer, and with `--teacher` the
loss adds distillation from a teacher's logits as in recovery.

Choices where the published summary is not specific (each is a parameter):
- T is `transition` x the run's optimizer steps (default 0.5): the second half trains the compressed model alone, and
  the bundle is the best-on-validation epoch among those that end after T (earlier ones still hold the dense branch).
- The regulariser is the mean squared difference between each layer's student and dense outputs (the dense output
  detached), weighted by `reg_weight` x a_t^2: it pulls the student towards the pretrained map while the output still
  leans on it, and decays to zero with a_t.
- Pruning is gradual magnitude pruning (hard shrinkage of the smallest entries) of each factor, to `prune_ratio` on a
  cubic schedule s_t = P (1 - (1 - t/T)^3) (Zhu & Gupta 2017; `prune_schedule="linear"`: s_t = P t/T, measured
  against it in benchmarks/tunecomp.py), updated every `prune_every` steps and exact at T; a pruned entry stays pruned
  (zeroed after every step), so the saved factors hold exactly round(P x size) zeros. Cubic prunes most while the
  dense branch still carries the output and little near T, when the student alone must absorb each cut.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from craft_deploy.compress.lowrank import (
    LowRankConfig,
    channel_rms,
    factor_module,
    factorisable,
    factorise,
    weight_2d,
)
from craft_deploy.compress.prune import PruneConfig
from craft_deploy.toolkit.layers import replace_module, select_layers
from craft_deploy.toolkit.registry import CalibLoop, manifest_entry


class Schedule(nn.Module):
    """The step counter (a buffer: checkpointed and resumed with the model) and what depends on it."""

    def __init__(self, transition_steps: int, prune_ratio: float, reg_weight: float, prune_schedule: str = "cubic"):
        super().__init__()
        self.transition_steps, self.prune_ratio, self.reg_weight = max(1, transition_steps), prune_ratio, reg_weight
        self.prune_schedule = prune_schedule
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.penalties: list[torch.Tensor] = []

    @property
    def progress(self) -> float:
        return min(1.0, int(self.step) / self.transition_steps)

    def alpha(self) -> float:
        """Weight of the dense branch: 1 - sin(pi t / 2T), 0 from T on."""
        return 0.0 if self.progress >= 1.0 else 1.0 - math.sin(math.pi * self.progress / 2)

    def sparsity(self) -> float:
        """The ramp to prune_ratio at T: cubic (fast early) or linear."""
        if self.prune_schedule == "linear":
            return self.prune_ratio * self.progress
        return self.prune_ratio * (1.0 - (1.0 - self.progress) ** 3)


class TuneCompLayer(nn.Module):
    """a_t dense(x) + sqrt(1 - a_t^2) student(x); the student alone once a_t is 0."""

    def __init__(self, dense: nn.Module, student: nn.Module, schedule: Schedule):
        super().__init__()
        self.dense = dense.requires_grad_(False)
        self.student = student
        object.__setattr__(self, "_schedule", schedule)  # shared, registered once on the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._schedule.alpha()
        s = self.student(x)
        if a == 0.0:
            return s
        d = self.dense(x)
        if self.training and self._schedule.reg_weight > 0:
            self._schedule.penalties.append(F.mse_loss(s.float(), d.detach().float()))
        return a * d + math.sqrt(1.0 - a * a) * s


class TuneComp:
    """Sets up a model for TuneComp, prunes its factors as training goes, and turns it into a plain compressed model
    at the end (with the manifest entries that rebuild it on load)."""

    SCHEDULE = "tunecomp_schedule"

    def __init__(
        self,
        model: nn.Module,
        lowrank: LowRankConfig,
        calib: CalibLoop,
        total_steps: int,
        transition: float,
        prune_ratio: float,
        reg_weight: float,
        prune_every: int = 0,
        prune_schedule: str = "cubic",
    ):
        self.model, self.lowrank, self.prune_ratio = model, lowrank, prune_ratio
        self.schedule = Schedule(round(transition * total_steps), prune_ratio, reg_weight, prune_schedule)
        self.prune_every = prune_every or max(1, self.schedule.transition_steps // 50)
        candidates, self.skipped = select_layers(
            model, lowrank.include, lowrank.exclude, skip_stem=False, skip_depthwise=False
        )
        layers = {n: m for n, m in candidates.items() if factorisable(m) is None}
        rms = channel_rms(model, layers, calib) if lowrank.activation_aware else {}
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        with torch.no_grad():
            for name, mod in layers.items():
                w = weight_2d(mod)
                a, b, r = factorise(w, rms.get(name), None, lowrank)
                if r * sum(w.shape) >= w.numel():
                    self.skipped[name] = f"rank {r} of {tuple(w.shape)} would not be smaller; trained dense"
                    continue
                replace_module(model, name, TuneCompLayer(mod, factor_module(mod, a, b), self.schedule))
                self.ranks[name], self.shapes[name] = r, tuple(w.shape)
        model.add_module(self.SCHEDULE, self.schedule)
        self.masks: dict[str, torch.Tensor] = {}

    def factors(self) -> dict[str, torch.Tensor]:
        """The student factor weights by their name in the final model (`layer.a`, `layer.b`)."""
        out = {}
        for name in self.ranks:
            student = self.model.get_submodule(name).student
            out[f"{name}.a"], out[f"{name}.b"] = student.a.weight, student.b.weight
        return out

    def extra_loss(self) -> torch.Tensor | float:
        """The decaying regulariser over the layers' outputs since the last call."""
        pens, self.schedule.penalties = self.schedule.penalties, []
        if not pens:
            return 0.0
        return self.schedule.reg_weight * self.schedule.alpha() ** 2 * torch.stack(pens).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        self.schedule.step += 1
        if self.prune_ratio <= 0:
            return
        step, t = int(self.schedule.step), self.schedule.transition_steps
        if step <= t and (step % self.prune_every == 0 or step == t):
            for name, w in self.factors().items():
                self.masks[name] = self._mask(w, self.masks.get(name), self.schedule.sparsity())
        for name, w in self.factors().items():
            mask = self.masks.get(name)
            if mask is None and step > t:  # resumed after T: the zeros saved are the mask
                mask = self.masks[name] = (w != 0).to(w.dtype)
            if mask is not None:
                w.mul_(mask)

    @staticmethod
    def _mask(w: torch.Tensor, previous: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        """Keep all but the round(sparsity x size) smallest |w|; entries pruned before are pruned first."""
        k = round(sparsity * w.numel())
        score = w.detach().abs().flatten().clone()
        if previous is not None:
            score[previous.flatten() == 0] = -1.0
        mask = torch.ones_like(score)
        if k > 0:
            mask[torch.topk(score, k, largest=False).indices] = 0.0
        return mask.reshape(w.shape).to(w.dtype)

    def eligible(self) -> bool:
        """Whether the model is the compressed one (the dense branches are out of the output)."""
        return self.schedule.alpha() == 0.0

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Drop the dense branches and the schedule; returns the manifest entries of the factorisation (and of the
        factors' pruning) and a report."""
        for name in self.ranks:
            replace_module(self.model, name, self.model.get_submodule(name).student)
        del self.model._modules[self.SCHEDULE]
        entries = [
            manifest_entry(
                self.lowrank,
                {"state": {"layers": {n: {"rank": r} for n, r in self.ranks.items()}, "activation_aware": True}},
            )
        ]
        factors = [f"{n}.{f}" for n in self.ranks for f in ("a", "b")]
        zeros = {}
        if self.prune_ratio > 0:
            prune = PruneConfig(ratio=self.prune_ratio, include=tuple(factors))
            layers = {n: prune.pattern for n in factors}
            entries.append(
                manifest_entry(
                    prune, {"state": {"pattern": prune.pattern, "score": "magnitude", "granularity": "layer",
                                      "layers": layers}}
                )
            )  # fmt: skip
            for n in factors:
                w = self.model.get_submodule(n).weight
                zeros[n] = float((w == 0).float().mean())
        dense = sum(o * i for o, i in self.shapes.values())
        kept = sum(r * (o + i) for (o, i), r in zip(self.shapes.values(), self.ranks.values(), strict=True))
        report = {
            "layers": {n: {"rank": r, "shape": list(self.shapes[n])} for n, r in self.ranks.items()},
            "skipped": self.skipped,
            "params_dense": dense,
            "params_factors": kept,
            "params_factors_nonzero": round(kept * (1 - self.prune_ratio)),
            "factor_zero_fraction": zeros,
            "transition_steps": self.schedule.transition_steps,
        }
        return entries, report
