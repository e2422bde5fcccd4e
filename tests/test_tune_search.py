"""The search over a sensitivity table (craft_deploy.tune.search) on hand-made tables: the paths, the hull, the
bisection and the objectives' values."""

from __future__ import annotations

import pytest

from craft_deploy import CraftError
from craft_deploy.compress.recipe import parse_treatment
from craft_deploy.tune.search import (
    DEFAULT_SEARCHES,
    NO_GAIN_MS,
    SEARCHES,
    Option,
    _hull,
    bisect_path,
    budgeted_path,
    check_objective,
    fallback_path,
    fit_slope,
    layer_options,
    prefix_path,
    recipe_kl,
    recipe_value,
    treatments_of,
    weight_bits,
)

ROWS = [
    # layer a: int8 is cheap, w4 costs a lot more; layer b: both cheap; layer c: 2:4 skipped (depthwise-like)
    {"layer": "a", "treatment": "int8", "params": 1000, "kl": 0.01},
    {"layer": "a", "treatment": "w4", "params": 1000, "kl": 0.50},
    {"layer": "b", "treatment": "int8", "params": 4000, "kl": 0.02},
    {"layer": "b", "treatment": "w4", "params": 4000, "kl": 0.04},
    {"layer": "c", "treatment": "int8", "params": 100, "kl": 0.30},
    {"layer": "c", "treatment": "2:4", "params": 100, "skipped": "not a 2:4 layer"},
]


def test_weight_bits_count_the_index_of_n_m():
    assert weight_bits(parse_treatment("float")) == 32
    assert weight_bits(parse_treatment("int8")) == 8 and weight_bits(parse_treatment("w4")) == 4
    assert weight_bits(parse_treatment("2:4")) == pytest.approx(0.5 * (32 + 2))
    assert weight_bits(parse_treatment("2:4+int8")) == pytest.approx(5.0)
    assert weight_bits(parse_treatment("1:4+w4a16")) == pytest.approx(0.25 * (4 + 2))


def test_layer_options_keep_only_scored_treatments_with_value():
    size = layer_options(ROWS, "size")
    assert list(size) == ["a", "b", "c"]
    assert [o.treatment for o in size["a"]] == ["float", "int8", "w4"]
    assert size["b"][2].value == 4000 * (32 - 4) and [o.treatment for o in size["c"]] == ["float", "int8"]
    assert layer_options(ROWS, "sparse-share") == {}  # nothing scored 2:4
    with pytest.raises(CraftError, match="--objective speed is not one of size, sparse-share, latency"):
        check_objective("speed")
    # latency's value is the kernel time a treatment saves on the layer, measured; a treatment that saves none is an
    # option of next to no value (it keeps its neighbours' boundaries away); an unpriced row is none
    timed = [{**r, "saved_ms": {"a": 0.2, "b": -0.1}[r["layer"]]} for r in ROWS if r["layer"] != "c"]
    latency = layer_options([*timed, *ROWS[4:]], "latency")
    assert list(latency) == ["a", "b"] and [o.value for o in latency["a"]] == [0.0, 0.2, 0.2]
    assert [o.value for o in latency["b"]] == [0.0, NO_GAIN_MS, NO_GAIN_MS]


def test_hull_skips_a_dominated_option():
    opts = [Option("float", 0, 0), Option("x", 1.0, 10), Option("y", 1.1, 11), Option("z", 0.2, 9)]
    # from float the best value per KL is z (9 / 0.2); from z, y adds 2 / 0.9 and x only 1 / 0.8: float-z-y
    assert [o.treatment for o in _hull(opts)] == ["float", "z", "y"]


def test_fallback_reverts_the_worst_kl_per_value_first():
    options = layer_options(ROWS, "size")
    path = fallback_path(options)
    assert treatments_of(path[0]) == {"a": "w4", "b": "w4", "c": "int8"}
    # KL per value: c 0.30/2400, a 0.50/28000, b 0.04/112000
    assert [set(treatments_of(p)) for p in path[1:]] == [{"a", "b"}, {"b"}, set()]
    values = [recipe_value(p) for p in path]
    assert values == sorted(values, reverse=True)


def test_prefix_reverts_layers_in_forward_order_leaving_one_boundary():
    options = layer_options(ROWS, "size")
    path = prefix_path(options)
    assert treatments_of(path[0]) == {"a": "w4", "b": "w4", "c": "int8"}
    assert [sorted(treatments_of(p)) for p in path[1:]] == [["b", "c"], ["c"], []]
    for p in path:  # the float layers are always the first ones: float, ..., float, treated, ..., treated
        kinds = [p[name].treatment == "float" for name in options]
        assert kinds == sorted(kinds, reverse=True)
    assert DEFAULT_SEARCHES["latency"] == ("fallback", "budgeted", "prefix") and "prefix" in SEARCHES


def test_budgeted_path_steps_down_each_layers_hull_and_is_cheaper_at_equal_value():
    options = layer_options(ROWS, "size")
    path = budgeted_path(options)
    assert treatments_of(path[0]) == {"a": "w4", "b": "w4", "c": "int8"}
    assert treatments_of(path[-1]) == {}
    # every step moves one layer one hull step down, so KL and value both fall along the path
    for prev, nxt in zip(path, path[1:]):
        assert sum(prev[n] != nxt[n] for n in prev) == 1
        assert recipe_kl(nxt) <= recipe_kl(prev) and recipe_value(nxt) < recipe_value(prev)
    # KL saved per value given up: c to float 0.30/2400, then a w4 -> int8 0.49/24000: a keeps int8 where
    # fallback drops it to float, so at the same step the budgeted recipe is both larger and cheaper
    assert treatments_of(path[1]) == {"a": "w4", "b": "w4"}
    assert treatments_of(path[2]) == {"a": "int8", "b": "w4"}
    fb = fallback_path(options)
    assert treatments_of(fb[2]) == {"b": "w4"}
    assert recipe_value(path[2]) > recipe_value(fb[2]) and recipe_kl(path[2]) < recipe_kl(fb[1])


def test_bisect_finds_the_most_aggressive_recipe_within_target_and_never_measures_all_float():
    path = [{"i": Option(str(i), 0, 0)} for i in range(40)]
    drops = [4.0 - 0.1 * i for i in range(40)]  # falls along the path; <= 1.0 from index 30 on
    seen = []

    def measure(recipe):
        i = int(recipe["i"].treatment)
        seen.append(i)
        return drops[i]

    assert bisect_path(path, measure, 1.0) == 30
    assert 39 not in seen and len(seen) <= 8 + 4
    assert bisect_path(path, lambda r: 0.0, 1.0) == 0
    assert bisect_path(path, lambda r: 9.0, 1.0) == 39  # nothing measured passes: all float


def test_bisect_grid_is_not_misled_by_one_noisy_point():
    path = [{"i": Option(str(i), 0, 0)} for i in range(40)]
    drops = [3.0 if i < 10 else 0.5 for i in range(40)]
    drops[20] = 2.0  # a noisy measurement in the middle: plain bisection from [0, 39] would stop past it
    assert bisect_path(path, lambda r: drops[int(r["i"].treatment)], 1.0) == 10


def test_slope_through_the_origin():
    assert fit_slope([(1.0, 2.0), (2.0, 4.0)]) == pytest.approx(2.0)
    assert fit_slope([(0.0, 1.0)]) is None
