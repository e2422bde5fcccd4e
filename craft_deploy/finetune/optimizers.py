"""Training-step methods, one registered class each: the trainer only calls `step` and never branches on the name."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.config import FinetuneConfig
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.toolkit.primitives import as_input_groups, from_input_groups, nm_mask
from craft_deploy.toolkit.registry import name_registrar

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS: dict[str, type[StepMethod]] = {}


register_optimizer = name_registrar(OPTIMIZERS)
"""Class decorator adding a class to OPTIMIZERS under a name."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: none on norms, biases and other 1-D parameters, nor on what
    the model's `no_weight_decay()` names (timm's convention: a ViT's pos_embed and cls_token; globs allowed)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim <= 1 or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
            (no_decay if exempt else decay).append(p)
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
    default_rho: float | None = None  # a perturbation method's radius when --rho is not given

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, net: nn.Module | None = None):
        self.model = model
        self.net = net if net is not None else model  # what runs forward: the model, or its DDP wrapper
        self.cfg = cfg
        self.rho = cfg.rho if cfg.rho is not None else self.default_rho
        groups = param_groups(model, cfg.weight_decay)
        if self.base_name() == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        device = next(model.parameters()).device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    def base_name(self) -> str:
        return self.cfg.base

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, sync: bool = True) -> torch.Tensor:
        """Loss and gradients of the batch, in --grad-accum micro-batches (each loss weighted by its share).

        Under DDP, gradients are all-reduced on the last micro-batch only, and not at all when `sync` is False (SAM's
        ascent pass: each replica perturbs along its own gradient).
        """
        total = torch.zeros(())
        chunks = list(zip(x.chunk(self.cfg.grad_accum), y.chunk(self.cfg.grad_accum)))
        for i, (xc, yc) in enumerate(chunks):
            local = not sync or i < len(chunks) - 1
            ctx = self.net.no_sync() if local and hasattr(self.net, "no_sync") else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device_type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    loss = loss_fn(self.net(xc), yc).float() * (len(yc) / len(y))
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().cpu()
        return total

    def grad_scale(self) -> float:
        """The factor fp16 loss scaling multiplied the gradients by (1 without it)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> float:
        raise NotImplementedError

    def base_step(self) -> None:
        """The base optimizer's step with the gradients the method left, clipped to --clip-grad (global norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.params(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@register_optimizer("adam")
class Adam(StepMethod):
    """AdamW, the baseline."""

    def base_name(self) -> str:
        return "adam"

    def step(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x, y, loss_fn)
        self.base_step()
        return loss.item()


@register_optimizer("sgd")
class SGD(Adam):
    """SGD with Nesterov momentum 0.9, the other baseline."""

    def base_name(self) -> str:
        return "sgd"


@register_optimizer("sam")
class SAM(StepMethod):
    """Sharpness-aware minimisation (Foret et al.) around the base optimizer (--base adam|sgd).

    Ascend to w + rho * g / ||g|| (one global norm), take the gradient there with BatchNorm running statistics
    frozen, restore w and let the base optimizer step with that gradient. With --sam-every K > 1 (an efficient SAM)
    the ascent direction is computed fresh only every K steps; the steps between reuse it, so they cost one forward
    and backward pass like the base optimizer: about (K + 1) / K of its time instead of 2x.
    """

    default_rho = 0.05

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, net: nn.Module | None = None):
        super().__init__(model, cfg, net)
        self.steps = 0
        self.stale: list[tuple[nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def ascent(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The perturbation e for each parameter, from the gradients they hold."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if not torch.isfinite(norm):  # an fp16 overflow: no perturbation this step
            return [torch.zeros_like(p) for p in params]
        scale = self.rho / (norm + 1e-12)
        return [p.grad * scale for p in params]

    def step(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        fresh = self.steps % self.cfg.sam_every == 0 or not self.stale
        self.steps += 1
        if fresh:
            loss = self.forward_backward(x, y, loss_fn, sync=False)
            params = self.params()
            moved = list(zip(params, self.ascent(params)))
            if self.cfg.sam_every > 1:
                self.stale = moved
            self.optimizer.zero_grad(set_to_none=True)
        else:
            moved = self.stale
        with torch.no_grad():
            for p, e in moved:
                p.add_(e)
        if fresh:
            with frozen_bn_stats(self.model):
                self.forward_backward(x, y, loss_fn)
        else:  # the only pass of this step: BatchNorm statistics update as in a base step
            loss = self.forward_backward(x, y, loss_fn)
        with torch.no_grad():
            for p, e in moved:
                p.sub_(e)
        self.base_step()
        return loss.item()


@register_optimizer("asam")
class ASAM(SAM):
    """Adaptive SAM (Kwon et al.): the neighbourhood is scaled per weight by |w| + eta, so rho is larger (0.5)."""

    default_rho = 0.5
    eta = 0.01

    @torch.no_grad()
    def ascent(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        scaled = [(p.abs() + self.eta) * p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in scaled]))
        if not torch.isfinite(norm):
            return [torch.zeros_like(p) for p in params]
        return [(p.abs() + self.eta) * t * (self.rho / (norm + 1e-12)) for p, t in zip(params, scaled)]


@register_optimizer("cram")
class CrAM(StepMethod):
    """CrAM (Peste et al.): the gradient is taken at C(w + rho * g), the compressed ascent point, and applied at w.

    C keeps the largest weights globally at a sparsity drawn each step from --cram-sparsities, or keeps N of every M
    along the input dimension per layer with --cram-nm. The classifier head, stem and depthwise convs stay dense.
    With --cram-plus (CrAM+) the clean gradient at w is added to the update.
    """

    default_rho = 0.05

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, net: nn.Module | None = None):
        super().__init__(model, cfg, net)
        self.layers = list(select_layers(model)[0].values())
        self.nm = tuple(int(v) for v in cfg.cram_nm.split(":")) if cfg.cram_nm else None

    @torch.no_grad()
    def compress(self) -> None:
        """Zero the weights C removes, in place."""
        if self.nm is not None:
            for mod in self.layers:
                rows = as_input_groups(mod.weight)
                if rows.shape[-1] % self.nm[1] == 0:
                    mod.weight.copy_(from_input_groups(rows * nm_mask(rows.abs(), *self.nm), mod.weight))
            return
        choices = self.cfg.cram_sparsities
        sparsity = choices[int(torch.randint(len(choices), ()))]
        scores = torch.cat([mod.weight.abs().flatten() for mod in self.layers])
        k = int(round(sparsity * scores.numel()))
        if k > 0:
            threshold = scores.kthvalue(k).values
            for mod in self.layers:
                mod.weight.mul_(mod.weight.abs() > threshold)

    def step(self, x, y, loss_fn):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x, y, loss_fn, sync=self.cfg.cram_plus)
        params = self.params()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            clean = [p.grad.clone() for p in params] if self.cfg.cram_plus else None
            for p in params:
                p.add_(torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0), alpha=self.rho / self.grad_scale())
            self.compress()
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_bn_stats(self.model):
            self.forward_backward(x, y, loss_fn)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[i])
                if p.grad is None:  # pruned to nothing downstream: no gradient at the compressed point
                    p.grad = torch.zeros_like(p)
                if clean is not None:
                    p.grad.add_(clean[i])
        self.base_step()
        return loss.item()


def optimizer_class(name: str) -> type[StepMethod]:
    """The method registered as `name`, or an error listing the registered ones."""
    if name not in OPTIMIZERS:
        raise CraftError(f"unknown optimizer {name!r}; registered: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def build_method(model: nn.Module, cfg: FinetuneConfig, net: nn.Module | None = None) -> StepMethod:
    """An instance of the method `cfg.optimizer` names, for `model` (run forward through `net`, e.g. DDP, if given)."""
    return optimizer_class(cfg.optimizer)(model, cfg, net)
