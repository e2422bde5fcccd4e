"""Compression methods: a frozen config dataclass plus the function registered for it (torchao/modelopt pattern)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

CalibLoop = Callable[[nn.Module], None]
"""Runs calibration batches through a model; methods never touch datasets themselves."""


@dataclass(frozen=True)
class MethodConfig:
    """Base of every compression method's config."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def calibrate_with_hooks(model: nn.Module, calib: CalibLoop, handles: list) -> None:
    """Run `calib` on `model` in eval mode with forward hooks `handles` installed, removing them afterwards."""
    try:
        model.eval()
        calib(model)
    finally:
        for h in handles:
            h.remove()


METHODS: dict[type[MethodConfig], Callable[..., dict[str, Any]]] = {}


def register_method(cfg_cls: type[MethodConfig]):
    """Register `fn(model, cfg, calib) -> report` as the implementation of `cfg_cls`."""

    def deco(fn):
        METHODS[cfg_cls] = fn
        return fn

    return deco


def apply_method(model: nn.Module, cfg: MethodConfig, calib: CalibLoop | None) -> dict[str, Any]:
    """Apply the registered method for `cfg` to `model` in place; returns its report."""
    return METHODS[type(cfg)](model, cfg, calib)
