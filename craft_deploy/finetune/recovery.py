"""Recovery fine-tuning of a compressed bundle (`finetune --init BUNDLE`): training continues with the compression in
place, optionally distilling from the dense model.

- Pruning masks stay exact: the mask of every pruned layer (its zeros at load) zeroes that weight's gradient, so the
  optimizer's moments stay zero there, and is applied again after every optimizer step (weight decay and momentum
  cannot move a pruned weight); the saved bundle has the input's N:M or unstructured pattern, zero for zero.
- Quantized layers train through their fake-quant ops with the straight-through estimator: weights are re-quantized
  on every forward with the bundle's per-channel/per-group scales; activation scales stay frozen (calibrated ranges).
- BatchNorm trains in train mode like any fine-tune and is re-estimated on calibration images at the end, under the
  compressed forward pass (the statistics the deployed, folded model will see).
- Distillation: KL(teacher || student) at temperature T, times T^2 (so its gradients keep their size across T), times
  `kd_alpha`, added to the task loss. The teacher runs in eval mode without gradients; its logits for a batch travel
  packed with the labels, so gradient accumulation, SAM's second pass and torchrun sharding all see the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from craft_deploy import CraftError
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import method_state


def prunable_weight(mod: nn.Module) -> torch.Tensor:
    """The tensor that holds a layer's weights: the parametrization's original for quantized layers."""
    return mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight


class MaskKeeper:
    """Keeps the zeros of every pruned layer of a model exactly zero while it trains."""

    def __init__(self, model: nn.Module, manifest: dict[str, Any]):
        pruned = method_state(manifest, "prune") or {}
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in pruned.get("layers", {}):
            w = prunable_weight(model.get_submodule(name))
            self.masks[name] = (w, (w != 0).to(w.dtype))
        self.handles = [
            w.register_hook(lambda g, n=name: g * self._mask(n, g.device)) for name, (w, _) in self.masks.items()
        ]

    def _mask(self, name: str, device: torch.device) -> torch.Tensor:
        """The mask of layer `name` on `device`, moved there once (the model may move after the keeper is made)."""
        w, mask = self.masks[name]
        if mask.device != device:
            mask = mask.to(device)
            self.masks[name] = (w, mask)
        return mask

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights again (after an optimizer step)."""
        for name, (w, _) in self.masks.items():
            w.mul_(self._mask(name, w.device))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class DistillationLoss:
    """Task loss plus `alpha` * T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean.

    Targets are packed: column 0 the label, the rest the teacher's logits (see `pack`)."""

    def __init__(self, task: nn.Module, temperature: float, alpha: float):
        self.task, self.temperature, self.alpha = task, temperature, alpha

    @staticmethod
    def pack(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([labels[:, None].to(teacher_logits.dtype), teacher_logits], dim=1)

    def __call__(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        labels, teacher = packed[:, 0].long(), packed[:, 1:].float()
        return self.task(logits, labels) + self.alpha * self.kd(logits.float(), teacher)

    def kd(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return (
            F.kl_div(
                F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
            )
            * t
            * t
        )


def learn_activation_scales(model: nn.Module) -> list[nn.Parameter]:
    """Turn every per-tensor activation quantizer's scale into a trainable parameter (LSQ); returns them. They are
    created before the optimizer, so it trains them with the weights; `keep_positive` runs after each step."""
    from craft_deploy.toolkit.qmodules import ActQuantizer

    quantizers = [q for q in model.modules() if isinstance(q, ActQuantizer)]
    if any(q.number_format == "fp8" for q in quantizers):
        raise CraftError(
            "--learn-scales trains integer-grid activation scales (LSQ); this bundle is FP8, whose scales stay "
            "frozen: drop --learn-scales"
        )
    return [q.learn_scale() for q in quantizers]


@torch.no_grad()
def keep_positive(scales: list[nn.Parameter], floor: float = 1e-8) -> None:
    """A learned scale never reaches zero or below."""
    for s in scales:
        s.clamp_(min=floor)


def teacher_path(init: str | Path, manifest: dict[str, Any], teacher: str | None) -> str | None:
    """The teacher to distil from: `teacher` if given, else the dense bundle the compressed one was made from (the
    `source` its last compress stage records), or a CraftError saying to pass --teacher."""
    if teacher is not None:
        return teacher
    sources = [s.get("source") for s in manifest.get("stages", []) if s.get("stage") == "compress"]
    if not sources or not sources[-1]:
        raise CraftError(
            f"{init} does not record the bundle it was compressed from; pass --teacher DENSE_BUNDLE, or --kd-alpha 0 "
            "to recover without distillation"
        )
    if not Path(sources[-1]).is_dir():
        raise CraftError(
            f"{init} was compressed from {sources[-1]}, which is not there any more; pass --teacher DENSE_BUNDLE, "
            "or --kd-alpha 0 to recover without distillation"
        )
    return sources[-1]


def load_teacher(path: str | Path, student: dict[str, Any]) -> nn.Module:
    """The teacher bundle's model in eval mode without gradients, checked to fit the student's task (its manifest's,
    or a dict of, num_classes, input_size and dataset)."""
    teacher = load_bundle(path)
    for key in ("num_classes", "input_size", "dataset"):
        if teacher.manifest.get(key) != student.get(key):
            raise CraftError(
                f"--teacher {path} has {key} {teacher.manifest.get(key)!r}, the student {student.get(key)!r}: "
                "distil from a model of the same task"
            )
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    return teacher.model.eval()
