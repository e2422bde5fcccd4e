"""Training-step methods, one registered class each: the trainer only calls `step` and never branches on the name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.config import FinetuneConfig
from craft_deploy.registry import name_registrar

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS: dict[str, type[StepMethod]] = {}


register_optimizer = name_registrar(OPTIMIZERS)
"""Class decorator adding a class to OPTIMIZERS under a name."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only; none on norms, biases and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, nbt) in zip(bns, saved):
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


class StepMethod:
    """One optimisation step on a batch; wraps a torch optimizer (exposed as `.optimizer` for the LR schedule)."""

    name = "base"

    def __init__(self, model: nn.Module, cfg: FinetuneConfig):
        self.model = model
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        loss = loss_fn(self.model(x), y)
        loss.backward()
        return loss.detach()

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


@register_optimizer("adam")
class Adam(StepMethod):
    """AdamW, the baseline."""

    def step(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x, y, loss_fn)
        self.optimizer.step()
        return loss.item()


@register_optimizer("sam")
class SAM(StepMethod):
    """Sharpness-aware minimisation (Foret et al.) around AdamW.

    Ascend to w + rho * g / ||g|| (one global norm), take the gradient there with BatchNorm running statistics
    frozen, restore w and let the base optimizer step with that gradient.
    """

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _perturb(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        params = self._params()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.cfg.rho / (norm + 1e-12)
        moved = []
        for p in params:
            e = p.grad * scale
            p.add_(e)
            moved.append((p, e))
        return moved

    def step(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x, y, loss_fn)
        moved = self._perturb()
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_bn_stats(self.model):
            self.forward_backward(x, y, loss_fn)
        with torch.no_grad():
            for p, e in moved:
                p.sub_(e)
        self.optimizer.step()
        return loss.item()


def optimizer_class(name: str) -> type[StepMethod]:
    """The method registered as `name`, or an error listing the registered ones."""
    if name not in OPTIMIZERS:
        raise CraftError(f"unknown optimizer {name!r}; registered: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def build_method(model: nn.Module, cfg: FinetuneConfig) -> StepMethod:
    """An instance of the method `cfg.optimizer` names, for `model`."""
    return optimizer_class(cfg.optimizer)(model, cfg)
