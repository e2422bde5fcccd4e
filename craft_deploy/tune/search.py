"""The search for a per-layer recipe under an accuracy budget, over the sensitivity table.

Every layer has options: float, and each treatment the table scored on it, with its KL (the accuracy cost of that
layer alone) and its value for the objective (`OBJECTIVES`: weight bits saved, weights in N:M, or the kernel time
the treatment saves on that layer on the backend, measured by tune.latency). Two searches build
a path of recipes from the most aggressive (every layer at its most valuable option) to all float:

- **fallback** (as NNCF's accuracy control does): revert whole layers to float, the worst accuracy cost per unit of
  value first;
- **budgeted** (a Lagrangian over the table, i.e. a multiple-choice knapsack relaxed): every layer moves along its own
  convex hull of (KL, value), always taking the step that gives up the least value per unit of KL saved, so a layer
  can step down from w4 to int8 before it goes float. Each point of the path is the optimum for one price of KL;
- **prefix** (the latency objective's third): the first k layers float in forward order, the rest treated: one
  float -> integer boundary, where the other two paths may leave float layers scattered between treated ones.

The path is then searched (a coarse grid, then bisection) for its most aggressive recipe whose top-1 drop, measured
on the validation images (carved from the training split, never the test images), is within the budget less a margin.
The finalists (one per search) are checked afterwards on the held-out test images by the caller. A recipe's predicted
drop is `slope x sum of its layers' KL`, the slope fitted through the origin to the validation measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError
from craft_deploy.compress.recipe import Treatment, parse_treatment

FLOAT_BITS = 32


def weight_bits(t: Treatment) -> float:
    """Storage bits per weight: the value's bits, and for N:M only the kept n of every m plus a ceil(log2 m)-bit
    position index each (2:4 in float: 0.5 x (32 + 2) = 17; 2:4 + INT8: 5)."""
    bits = t.bits[0] if t.bits else FLOAT_BITS
    if not t.nm:
        return float(bits)
    n, m = t.nm
    return n / m * (bits + math.ceil(math.log2(m)))


def _size_value(t: Treatment, row: dict[str, Any]) -> float:
    return row["params"] * (FLOAT_BITS - weight_bits(t))


def _sparse_value(t: Treatment, row: dict[str, Any]) -> float:
    return float(row["params"]) if t.nm else 0.0


NO_GAIN_MS = 1e-6
"""The latency value of a treatment whose own kernels are no faster: a layer in the integer domain still spares its
neighbours the layout changes and Q/DQ of a float <-> integer boundary, which no per-layer price sees, so it stays an
option, of next to no value (the first a search reverts); the finalists' end-to-end timing decides."""


def _latency_value(t: Treatment, row: dict[str, Any]) -> float:
    return max(row["saved_ms"], NO_GAIN_MS) if "saved_ms" in row else 0.0


OBJECTIVES: dict[str, Callable[[Treatment, dict[str, Any]], float]] = {
    "size": _size_value,
    "sparse-share": _sparse_value,
    "latency": _latency_value,
}
"""Objective name -> the value of a treatment on a layer, from its table row (`params`, and for latency the
measured `saved_ms`); float has 0, and an option of value 0 (a layer the objective cannot gain on) is none."""

DEFAULT_TREATMENTS = {"size": ("int8", "w4", "w3"), "sparse-share": ("2:4",), "latency": ("w7a8",)}
"""The treatments each objective's table scores when --treatments is not given (2:4 in float is never smaller than
INT8, and only N:M counts towards the sparse share; W7A8 runs exactly in ONNX Runtime's integer kernels on every x86
CPU, AVX2-only ones included, where full-range 8-bit weights saturate)."""


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise CraftError(f"--objective {objective} is not one of {', '.join(OBJECTIVES)}")


@dataclass(frozen=True)
class Option:
    treatment: str
    kl: float
    value: float


def layer_options(rows: list[dict[str, Any]], objective: str) -> dict[str, list[Option]]:
    """Per layer (forward order): float, then every scored treatment that has value for the objective."""
    value_of = OBJECTIVES[objective]
    options: dict[str, list[Option]] = {}
    for r in rows:
        options.setdefault(r["layer"], [Option("float", 0.0, 0.0)])
        if "kl" not in r:
            continue
        value = value_of(parse_treatment(r["treatment"]), r)
        if value > 0:
            options[r["layer"]].append(Option(r["treatment"], max(r["kl"], 0.0), value))
    return {name: opts for name, opts in options.items() if len(opts) > 1}


Recipe = dict[str, Option]


def _most_valuable(opts: list[Option]) -> Option:
    return max(opts, key=lambda o: (o.value, -o.kl))


def fallback_path(options: dict[str, list[Option]]) -> list[Recipe]:
    """From every layer at its most valuable option to all float, reverting one layer at a time, the layer with the
    highest KL per unit of value first."""
    state = {name: _most_valuable(opts) for name, opts in options.items()}
    order = sorted(state, key=lambda n: -state[n].kl / state[n].value)
    path = [dict(state)]
    for name in order:
        state[name] = options[name][0]
        path.append(dict(state))
    return path


def _hull(opts: list[Option]) -> list[Option]:
    """The upper convex hull of (KL, value) from float up to the most valuable option: each next point gives the most
    value per unit of KL added."""
    hull = [opts[0]]
    rest = [o for o in opts[1:]]
    while True:
        here = hull[-1]
        ahead = [o for o in rest if o.value > here.value]
        if not ahead:
            return hull
        nxt = max(ahead, key=lambda o: ((o.value - here.value) / max(o.kl - here.kl, 1e-12), o.value))
        hull.append(nxt)


def budgeted_path(options: dict[str, list[Option]]) -> list[Recipe]:
    """The Lagrangian path: from every layer at the top of its hull down to all float, each step moving the one layer
    whose next step down saves the most KL per unit of value given up."""
    hulls = {name: _hull(opts) for name, opts in options.items()}
    at = {name: len(h) - 1 for name, h in hulls.items()}
    path = [{name: hulls[name][at[name]] for name in hulls}]
    while any(at.values()):

        def price(name: str) -> float:
            hi, lo = hulls[name][at[name]], hulls[name][at[name] - 1]
            return (hi.kl - lo.kl) / (hi.value - lo.value)

        name = max((n for n in at if at[n]), key=price)
        at[name] -= 1
        path.append({n: hulls[n][at[n]] for n in hulls})
    return path


def recipe_kl(recipe: Recipe) -> float:
    return sum(o.kl for o in recipe.values())


def recipe_value(recipe: Recipe) -> float:
    return sum(o.value for o in recipe.values())


def treatments_of(recipe: Recipe) -> dict[str, str]:
    return {name: o.treatment for name, o in recipe.items() if o.treatment != "float"}


def bisect_path(path: list[Recipe], measure: Callable[[Recipe], float], target: float, grid: int = 8) -> int:
    """The index of the most aggressive recipe on `path` whose measured drop is <= `target`: first `grid` evenly
    spaced recipes (so one noisy measurement cannot send the search far down the path), then bisection between the
    most aggressive passing grid point and the grid point before it. The last recipe, all float, is never measured:
    it drops nothing."""
    last = len(path) - 1
    points = sorted({round(i * last / grid) for i in range(grid)} - {last})
    passing = next((i for i in points if measure(path[i]) <= target), last)
    before = [i for i in points if i < passing]
    lo, hi = (before[-1], passing) if before else (passing, passing)  # measure(path[lo]) > target; path[hi] meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(path[mid]) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope through the origin of drop against summed KL; None without a point of positive KL."""
    sxx = sum(k * k for k, _ in points)
    return sum(k * d for k, d in points) / sxx if sxx > 0 else None


def prefix_path(options: dict[str, list[Option]]) -> list[Recipe]:
    """From every layer at its most valuable option to all float, reverting the layers in forward order: the first k
    layers float, the rest treated, one boundary between the two. On a CPU runtime every float <-> integer boundary
    costs a Q/DQ pair and a layout transpose, and the early layers (the stem, the first depthwise convs) are the ones
    that cost accuracy, so this path is the latency objective's: scattered float layers can make a recipe slower than
    the float model."""
    state = {name: _most_valuable(opts) for name, opts in options.items()}
    path = [dict(state)]
    for name in options:  # forward order
        state[name] = options[name][0]
        path.append(dict(state))
    return path


SEARCHES: dict[str, Callable[[dict[str, list[Option]]], list[Recipe]]] = {
    "fallback": fallback_path,
    "budgeted": budgeted_path,
    "prefix": prefix_path,
}

DEFAULT_SEARCHES = {
    "size": ("fallback", "budgeted"),
    "sparse-share": ("fallback", "budgeted"),
    "latency": ("fallback", "budgeted", "prefix"),
}
"""The searches each objective runs when --searches is not given."""
