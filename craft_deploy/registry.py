"""Name registries: a dict of classes plus the decorator that fills it (optimizers, backends)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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
