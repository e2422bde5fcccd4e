"""A method's command-line surface, declared once with its config: the options `compress` shows, what `from_flags`
reads, and the study's recipe tokens (`w8a8+mse+bn`) are all generated from these declarations.

A `Flag` is one option (`--calib-method`), usually bound to one config field (its default is the field's); a `Token`
is a recipe word that sets a flag (`mse` sets `--calib-method mse`, `bn` sets `--bn-recalibrate`). Nothing here
imports click: cli/ turns flags into click options, study/ turns tokens into flags.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def registry_names(where: str) -> tuple[str, ...]:
    """The names of a registry given as "module:TABLE", read when asked (so plugins' entries count)."""
    module, table = where.split(":")
    return tuple(getattr(importlib.import_module(module), table))


@dataclass(frozen=True)
class Token:
    """A recipe word that sets its flag: `pattern` is a regex the whole word must match, or `registry` ("module:TABLE")
    holds the accepted words; `value` turns the match into the flag's value (default: the word itself); `position`
    orders the words of a recipe's canonical name; `help` describes the word in error messages (`{names}`: the
    registry's names)."""

    help: str
    pattern: str = ""
    registry: str | None = None
    value: Callable[[re.Match | None, str], Any] | None = None
    position: int = 50
    word: Callable[[Any], str] | None = None  # the flag's value written back as a word (default: str(value))
    example: str | None = None  # a word to suggest in errors (default: the flag's example)

    def match(self, token: str) -> tuple[bool, Any]:
        """(whether `token` is this word, the flag value it sets)."""
        m = None
        if self.registry is not None:
            if token not in registry_names(self.registry):
                return False, None
        elif (m := re.fullmatch(self.pattern, token)) is None:
            return False, None
        return True, self.value(m, token) if self.value else token

    def describe(self) -> str:
        if self.registry is not None:
            return self.help.format(names=", ".join(registry_names(self.registry)))
        return self.help


@dataclass(frozen=True)
class Flag:
    """One command-line option of a method.

    `name` is the option without its dashes (`calib-method`; the keyword is `calib_method`). `field` names the config
    field it sets (whose default it shows); None for a flag the method's `from_flags` parses itself (`--quant w8a8`
    sets three fields). `kind` is str, int, float, "flag" (on if given) or "switch" (`--x/--no-x`). `choices` are fixed
    or a registry ("module:TABLE"). `needs` names the flag without which this one means nothing (refused alone).
    `example` and `what` word the errors of a method's trigger flag ("add e.g. w8a8", "without quantizing").
    """

    name: str
    help: str
    field: str | None = None
    kind: Any = str
    choices: tuple[str, ...] | str | None = None
    needs: str | None = None
    tokens: tuple[Token, ...] = ()
    example: str | None = None
    what: str | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def option(self) -> str:
        return "--" + self.name

    def first_example(self) -> str:
        """The first value of `example` (\"2:4 or 0.5\" -> \"2:4\"), or the flag's keyword when it has none."""
        return (self.example or self.key).split(" or ")[0]


def nonempty(value: Any) -> bool:
    """Whether a flag value asks for something: given at all (not None), not an off flag, not an empty string. A
    number is given even when it is 0 (`--rank-energy 0` is refused by its config, not ignored)."""
    return value is not None and value is not False and value != ""
