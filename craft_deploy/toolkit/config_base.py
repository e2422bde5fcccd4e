"""The base of every config: frozen dataclasses that round-trip through JSON and refuse non-finite floats."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from craft_deploy import CraftError

_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _of_type(value: Any, ann: str) -> bool:
    """Whether a JSON value fits a field annotation written as `int`, `float | None`, `tuple[str, ...]`, ..."""
    for alt in (a.strip() for a in ann.split("|")):
        if alt == "None" and value is None:
            return True
        if alt in _SCALARS and isinstance(value, _SCALARS[alt]) and (alt == "bool" or not isinstance(value, bool)):
            return True
        if alt.startswith("tuple[") and isinstance(value, (list, tuple)):
            inner = alt[len("tuple[") : -1].split(",")[0].strip()
            if all(_of_type(v, inner) for v in value):
                return True
        if alt not in _SCALARS and alt != "None" and not alt.startswith("tuple["):
            return True  # an annotation this check does not model (e.g. Literal): __post_init__ validates it
    return False


class Config:
    """Base of every config: a float field (alone or in a tuple) that is nan or infinite is refused before the
    config's own checks run, naming the option; a config of a subclass is checked the same way, by construction."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:
            return

        def __post_init__(self) -> None:
            _refuse_non_finite(self)
            own(self)

        cls.__post_init__ = __post_init__

    def __post_init__(self) -> None:
        _refuse_non_finite(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from JSON: unknown fields and values of the wrong type are CraftErrors naming the field."""
        return cls(**cls._checked(d))

    @classmethod
    def _checked(cls, d: Any) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise CraftError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise CraftError(f"{cls.__name__} has no field(s) {sorted(unknown)}; known: {sorted(fields)}")
        kw = {}
        for name, value in d.items():
            ann = str(fields[name].type)
            if not _of_type(value, ann):
                raise CraftError(f"{cls.__name__}.{name} must be {ann}, got {str(repr(value))[:60]}")
            kw[name] = tuple(value) if isinstance(value, list) and ann.startswith("tuple[") else value
        return kw


def _refuse_non_finite(cfg: Any) -> None:
    """CraftError for the first float field of `cfg` (or float inside a tuple field) that is nan or +-inf."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise CraftError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
