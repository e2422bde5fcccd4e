"""Compression methods as registered descriptors (modelopt's mode pattern, torchao's config + handler).

A method is one class registered with its frozen config: `apply(model, cfg, calib)` changes the model and returns a
report whose `state` is everything `restore(model, state)` needs to rebuild, on load, what `apply` changed in the
model's structure (quantizers, masks, factorised layers). `compress` records `{method, config, state}` per method in
the bundle manifest, in the order applied; `load_bundle` replays `restore` for every entry before loading weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from craft_deploy import CraftError
from craft_deploy.config import _Config

CalibLoop = Callable[[nn.Module], None]
"""Runs calibration batches through a model; methods never touch datasets themselves."""


@dataclass(frozen=True)
class MethodConfig(_Config):
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


class Method:
    """A compression method. Subclasses set nothing by hand: `register_method` gives them `name` and `config_cls`."""

    name: str = ""
    config_cls: type[MethodConfig] = MethodConfig

    def apply(self, model: nn.Module, cfg: MethodConfig, calib: CalibLoop | None) -> dict[str, Any]:
        """Change `model` in place; the report's `state` is what `restore` needs."""
        raise NotImplementedError

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild in a freshly built `model` the structure `apply` created, before its weights are loaded.

        `state` comes from a manifest on disk: anything that does not fit the model is a CraftError.
        """


METHODS: dict[str, type[Method]] = {}


def register_method(name: str, config_cls: type[MethodConfig]):
    """Class decorator: register a Method subclass under `name`, configured by `config_cls`."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"compression method {name!r} is registered twice")
        cls.name, cls.config_cls = name, config_cls
        config_cls.method_name = name  # what CompressConfig records for a config of this class
        METHODS[name] = cls
        return cls

    return deco


def method_for(cfg: MethodConfig) -> Method:
    """The registered method a config belongs to."""
    return METHODS[cfg.method_name]()


def method_named(name: str) -> Method:
    """The registered method `name`, or a CraftError listing the registered ones."""
    if name not in METHODS:
        raise CraftError(f"compression method {name!r} is unknown; this craft-deploy has {', '.join(METHODS)}")
    return METHODS[name]()


def apply_method(model: nn.Module, cfg: MethodConfig, calib: CalibLoop | None) -> dict[str, Any]:
    """Apply the registered method for `cfg` to `model` in place; returns its report."""
    return method_for(cfg).apply(model, cfg, calib)


def manifest_entry(cfg: MethodConfig, report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of one applied method."""
    return {"method": cfg.method_name, "config": cfg.to_dict(), "state": report["state"]}


def method_state(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The state of the last `name` method a bundle's manifest records, or None."""
    states = [e["state"] for e in manifest.get("methods", []) if e["method"] == name]
    return states[-1] if states else None


def restore_methods(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Replay `restore` for every method a manifest records, in the order they were applied."""
    for entry in manifest.get("methods", []):
        method_named(entry["method"]).restore(model, entry["state"])
