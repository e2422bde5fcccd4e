"""Registries: name-keyed class tables (calibrators, pruning scores, step methods, backends) and compression methods
as registered descriptors (modelopt's mode pattern, torchao's config + handler).

A method is one class registered with its frozen config: `apply(model, cfg, calib)` changes the model and returns a
report whose `state` is everything `restore(model, state)` needs to rebuild, on load, what `apply` changed in the
model's structure (quantizers, masks, factorised layers). `compress` records `{method, config, state}` per method in
the bundle manifest, in the order applied; `load_bundle` replays `restore` for every entry before loading weights.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.toolkit.config_base import Config
from craft_deploy.toolkit.flags import Flag, nonempty

T = TypeVar("T", bound=type)


def name_registrar(table: dict[str, type]) -> Callable[[str], Callable[[T], T]]:
    """A class decorator factory: `@register("name")` stores the class in `table` and sets its `name`."""

    def register(name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            table[name] = cls
            cls.name = name
            return cls

        return deco

    return register


CalibLoop = Callable[[nn.Module], None]
"""Runs calibration batches through a model; methods never touch datasets themselves."""


def calib_loop(ds: Dataset, batch_size: int = 64) -> CalibLoop:
    """A CalibLoop that runs every image of `ds` through a model once, without gradients."""

    @torch.no_grad()
    def loop(model: nn.Module) -> None:
        for x, _ in tqdm(
            DataLoader(ds, batch_size=batch_size), desc="calibrate", unit="batch", leave=False, disable=None
        ):
            model(x)

    return loop


@dataclass(frozen=True)
class MethodConfig(Config):
    """Base of every compression method's config, and of its command-line surface: `flags` are the options the method
    takes (compress's --help, `from_flags` and the study's recipe tokens are generated from them), `trigger` the keys of
    the flags that ask for the method, `order` its place in a chain built from flags, `verb` what it does to a model
    (recipe errors: "neither factorises, prunes nor quantizes")."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    flags = ()  # tuple[Flag, ...]; class attributes, not config fields
    trigger = ()  # tuple[str, ...]
    order = 50
    verb = ""

    @classmethod
    def flag_default(cls, flag: Flag) -> Any:
        """The default of a flag: its config field's, or None for a flag `from_flags` parses itself."""
        for f in dataclasses.fields(cls):
            if f.name == flag.field:
                return None if f.default is dataclasses.MISSING else f.default
        return None

    @classmethod
    def asked_for(cls, values: dict[str, Any]) -> bool:
        """Whether the flag values ask for this method (a trigger flag is set)."""
        return any(nonempty(values.get(k)) for k in cls.trigger)

    @classmethod
    def field_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The config fields the flag values set directly (each flag bound to a field)."""
        return {f.field: values[f.key] for f in cls.flags if f.field and f.key in values}

    @classmethod
    def from_flags(cls, values: dict[str, Any], include: tuple[str, ...], exclude: tuple[str, ...]) -> MethodConfig:
        """The config the flag values (every registered flag's, defaults filled in) describe; called only when
        `asked_for`. The default copies each flag bound to a field; a method whose flags parse into several fields
        overrides it."""
        kw = cls.field_values(values)
        return cls(include=include, exclude=exclude, **kw)


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
"""Registered methods by name. Read it through `registered_methods()`, which loads the built-in ones first."""

BUILTIN_MODULES = ("craft_deploy.compress",)
"""Modules whose import registers the built-in methods, calibrators and pruning scores: loaded by name on the first
lookup (as plugins are), so that this floor imports no stage."""

_builtins_loaded = False


def load_builtins() -> None:
    """Import the modules that register the built-in methods, calibrators and pruning scores (once)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method by name, the built-in ones loaded on first use."""
    load_builtins()
    return METHODS


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


def method_configs() -> list[type[MethodConfig]]:
    """The registered methods' configs in the order a chain built from flags applies them."""
    return sorted((m.config_cls for m in registered_methods().values()), key=lambda c: c.order)


def method_flags() -> dict[str, tuple[Flag, type[MethodConfig]]]:
    """Every registered method's flags by keyword, each once (a flag several methods take, such as
    --bn-recalibrate, is declared by each and kept from the first), with the config whose default it shows."""
    out: dict[str, tuple[Flag, type[MethodConfig]]] = {}
    for cls in method_configs():
        for flag in cls.flags:
            out.setdefault(flag.key, (flag, cls))
    return out


def method_for(cfg: MethodConfig) -> Method:
    """The registered method a config belongs to."""
    return METHODS[cfg.method_name]()


def method_named(name: str) -> Method:
    """The registered method `name`, or a CraftError listing the registered ones."""
    methods = registered_methods()
    if name not in methods:
        raise CraftError(f"compression method {name!r} is unknown; this craft-deploy has {', '.join(methods)}")
    return methods[name]()


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
