"""Per-layer recipes (issue 28): the sensitivity table (every treatment's cost on every layer alone, validated on
held-out images), and the search over it for the most aggressive per-layer recipe within an accuracy budget.

`tune BUNDLE --out DIR` writes DIR/tune.yaml (the recipe, which `compress --recipe` applies), DIR/bundle (the bundle
it makes, exactly what `compress --recipe DIR/tune.yaml` makes), tune.json (the table, every recipe the search
measured with its predicted and measured drop, each finalist's held-out check) and the plots. The search measures on
validation images; the finalists are checked once on the held-out test images, and a finalist over the budget there
is never returned. The table survives a killed run in DIR's partial directory and is reused by a rerun that scores
the same treatments with the same calibration. With `--objective latency` each layer's value is the kernel time its
treatment saves on the backend, measured (tune.latency), and the finalists within budget are timed side by side with
the dense model: the fastest measured one wins.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_json, check_out_dir, staged_dir
from craft_deploy.compress import run as compress_run
from craft_deploy.compress.recipe import LayerRecipe, parse_treatment
from craft_deploy.config import TuneConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.records import write_record
from craft_deploy.toolkit.registry import apply_method, calib_loop
from craft_deploy.tune.latency import (
    LATENCY_BACKENDS,
    check_latency,
    export_for_backend,
    price_layers,
    time_side_by_side,
)
from craft_deploy.tune.search import (
    DEFAULT_SEARCHES,
    DEFAULT_TREATMENTS,
    SEARCHES,
    Recipe,
    bisect_path,
    check_objective,
    fit_slope,
    layer_options,
    recipe_kl,
    recipe_value,
    treatments_of,
    weight_bits,
)
from craft_deploy.tune.sensitivity import check_treatments, sensitivity_table, validate_rows

__all__ = ["run", "weight_megabytes"]

ANALYZE_TREATMENTS = ("int8", "w4", "2:4")
TABLE_KEYS = ("treatments", "calib_samples", "prune_method", "seed")
"""The config fields the sensitivity table depends on (and the placement): a rerun that shares them (and the bundle)
reuses it."""


def placement_of(cfg: TuneConfig) -> str:
    """Where a recipe's activation quantizers sit: the latency backend's placement, else TensorRT's (layer inputs)."""
    return LATENCY_BACKENDS.get(cfg.backend, "tensorrt") if cfg.objective == "latency" else "tensorrt"


def run(cfg: TuneConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write tune.json and sensitivity.png to `out`; without `analyze_only` also the recipe search's tune.yaml, the
    tuned bundle and front.png."""
    treatments = cfg.treatments or (ANALYZE_TREATMENTS if cfg.analyze_only else DEFAULT_TREATMENTS.get(cfg.objective))
    check_objective(cfg.objective)
    treatments = check_treatments(treatments)
    if cfg.objective == "latency":
        check_latency(cfg, treatments)
    searches = cfg.searches or DEFAULT_SEARCHES[cfg.objective]
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown:
        raise CraftError(f"--searches {','.join(unknown)} is unknown; choose from {', '.join(SEARCHES)}")
    check_out_dir(out, overwrite, inputs=[bundle_path])
    bundle = load_bundle(bundle_path)
    with staged_dir(out, overwrite, resumable=True) as stage:
        t0 = time.perf_counter()
        splits = splits_for_manifest(bundle.manifest, cfg.data_root, cfg.eval_subset)
        calib = calibration_subset(splits.train, cfg.calib_samples, cfg.seed)
        model = bundle.model.eval()
        placement = placement_of(cfg)
        key = {"source": str(Path(bundle_path).resolve()), **{k: getattr(cfg, k) for k in TABLE_KEYS},
               "treatments": list(treatments), "placement": placement}  # fmt: skip
        rows = sensitivity_table(
            model, calib, treatments, cfg.prune_method, *_table_cache(stage, key), placement=placement
        )
        t1 = time.perf_counter()
        validation = validate_rows(model, rows, calib, splits.test, cfg.validate, cfg.prune_method, cfg.seed,
                                   placement=placement)  # fmt: skip
        plots = write_plot(rows, stage)
        found: dict[str, Any] = {}
        if not cfg.analyze_only and cfg.objective == "latency":
            layers = list(dict.fromkeys(r["layer"] for r in rows if "kl" in r))
            found["latency"] = price_layers(cfg, bundle_path, layers, treatments, stage / "latency")
            saved = {(r["layer"], r["treatment"]): r["saved_ms"] for r in found["latency"]["layers"]}
            for r in rows:
                if (r["layer"], r["treatment"]) in saved:
                    r["saved_ms"] = saved[r["layer"], r["treatment"]]
        if not cfg.analyze_only:
            try:
                found.update(search(cfg, searches, bundle_path, model, rows, calib, splits.val, stage,
                                    found.get("latency")))  # fmt: skip
            except CraftError:  # the table stays for a rerun; the exported files and timings do not
                shutil.rmtree(stage / "latency", ignore_errors=True)
                raise
            plots.append(write_front(found, cfg, searches, stage))
        (stage / "sensitivity.partial.json").unlink(missing_ok=True)
        record = write_record(
            stage,
            "tune",
            {**cfg.to_dict(), "treatments": list(treatments), "searches": list(searches)},
            source=str(bundle_path),
            data=splits.info,
            calibration={"samples": len(calib), "split": "train"},
            sensitivity=rows,
            validation=validation,
            **found,
            plots=plots,
            timings={"sensitivity_seconds": t1 - t0, "total_seconds": time.perf_counter() - t0},
        )
    return record


def _table_cache(stage: Path, key: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The rows an interrupted run with the same table key left in `stage`, and the callback that saves each new one."""
    path = stage / "sensitivity.partial.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows = saved.get("rows", []) if saved.get("key") == key else []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        atomic_write_json(path, {"key": key, "rows": rows})

    return list(rows), save


def _recipe(cfg: TuneConfig, treatments: dict[str, str]) -> LayerRecipe:
    return LayerRecipe(
        layers={n: parse_treatment(t) for n, t in treatments.items()},
        prune_method=cfg.prune_method,
        placement=placement_of(cfg),
        bn_recalibrate=cfg.bn_recalibrate,
        calib_samples=cfg.calib_samples,
        seed=cfg.seed,
    )


def search(
    cfg: TuneConfig,
    searches: tuple[str, ...],
    bundle_path: str | Path,
    model: nn.Module,
    rows: list[dict[str, Any]],
    calib: Dataset,
    val: Dataset,
    stage: Path,
    latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each search's path bisected on the validation images, the finalists compressed exactly as `compress --recipe`
    does and checked on the test images; the best finalist within budget becomes stage/tune.yaml and stage/bundle
    (for latency: the fastest, timed side by side with the files `latency` priced the layers with)."""
    options = layer_options(rows, cfg.objective)
    if latency is not None and all(r["saved_ms"] <= 0 for r in latency["layers"]):
        raise CraftError(
            f"no layer runs faster on {cfg.backend} with {', '.join(sorted({r['treatment'] for r in rows}))} than in "
            f"float (each layer's kernels profiled at batch {cfg.latency_batch}): the float model is the fastest "
            "recipe here; try another --backend or --latency-batch"
        )
    if not options:
        raise CraftError(f"no layer has a scored treatment that serves --objective {cfg.objective}")
    dense_val = evaluate(model, val, desc="val (dense)")["top1"]
    target = cfg.max_drop - cfg.margin
    measured: dict[tuple, dict[str, Any]] = {}
    total = sum(o.value for o in (max(opts, key=lambda o: o.value) for opts in options.values()))

    def measure(recipe: Recipe, where: str) -> float:
        chosen = treatments_of(recipe)
        k = tuple(sorted(chosen.items()))
        if not chosen:
            return 0.0
        if k not in measured:
            treated = copy.deepcopy(model)
            for mcfg in _recipe(cfg, chosen).compress_config().methods:
                apply_method(treated, mcfg, calib_loop(calib))
            top1 = evaluate(treated, val, desc="val (recipe)")["top1"]
            measured[k] = {"search": where, "val_top1_drop": dense_val - top1, **_summary(recipe, total)}
        return measured[k]["val_top1_drop"]

    finalists = []
    for name in tqdm(searches, desc="search", unit="search", leave=False, disable=None):
        path = SEARCHES[name](options)
        i = bisect_path(path, lambda r, name=name: measure(r, name), target)
        chosen = treatments_of(path[i])
        finalists.append({"search": name, "path_index": i, "path_length": len(path), "layers": chosen,
                          **_summary(path[i], total)})  # fmt: skip
    slope = fit_slope([(m["sum_kl"], m["val_top1_drop"]) for m in measured.values()])
    candidates = [{**m, "predicted_drop": None if slope is None else slope * m["sum_kl"]} for m in measured.values()]
    checked: dict[tuple, dict[str, Any]] = {}
    for f in finalists:
        k = tuple(sorted(f["layers"].items()))
        f["predicted_drop"] = None if slope is None else slope * f["sum_kl"]
        f["val_top1_drop"] = measured.get(k, {}).get("val_top1_drop", 0.0)
        if not f["layers"]:
            f.update(passed=False, why="every layer float: nothing within the budget on the validation images")
            continue
        if k not in checked:
            checked[k] = _held_out_check(cfg, bundle_path, f, stage / "finalists" / f["search"])
        f.update(checked[k])
    passing = [f for f in finalists if f["passed"]]
    if not passing:
        shutil.rmtree(stage / "finalists", ignore_errors=True)
        worst = ", ".join(f"{f['search']}: {f.get('why') or 'test drop %.2f' % f['test_top1_drop']}" for f in finalists)
        raise CraftError(
            f"no recipe within --max-drop {cfg.max_drop} on the held-out images ({worst}); allow a larger --max-drop "
            f"or --margin, or use more --calib-samples"
        )
    timing = None
    if latency is not None:
        timing = _time_finalists(cfg, passing, latency, stage)
        best = min(passing, key=lambda f: (f["latency"]["p50_ms"][cfg.latency_batch], f["val_top1_drop"]))
        if best["latency"]["speedup_vs_float"] < cfg.min_speedup:
            shutil.rmtree(stage / "finalists", ignore_errors=True)
            ms, base = (
                best["latency"]["p50_ms"][cfg.latency_batch],
                timing["models"]["float"]["p50_ms"][cfg.latency_batch],
            )
            raise CraftError(
                f"the fastest recipe within --max-drop {cfg.max_drop} ({best['search']}: {best['counts']}) runs at "
                f"{ms:.2f} ms against the float model's {base:.2f} ms (batch {cfg.latency_batch} on {cfg.backend}, "
                f"timed side by side), {best['latency']['speedup_vs_float']:.2f}x, under --min-speedup "
                f"{cfg.min_speedup}: keep the float model, or let more layers go with a larger --max-drop"
            )
    else:
        best = max(passing, key=lambda f: (f["value"], -f["val_top1_drop"]))
    shutil.move(str(best["bundle"]), stage / "bundle")
    shutil.rmtree(stage / "finalists", ignore_errors=True)
    for f in finalists:
        f.pop("bundle", None)
    speed = ""
    if latency is not None:
        ms = best["latency"]["p50_ms"][cfg.latency_batch]
        speed = (f"; {ms:.2f} ms p50 at batch {cfg.latency_batch} on {cfg.backend}, "
                 f"{best['latency']['speedup_vs_float']:.2f}x the float model's, timed side by side")  # fmt: skip
    comment = (
        f"craft-deploy tune {bundle_path}: --objective {cfg.objective} --max-drop {cfg.max_drop}, "
        f"search {best['search']}\nheld-out test top-1 drop {best['test_top1_drop']:.2f} points{speed}; apply with "
        "craft-deploy compress BUNDLE --recipe tune.yaml --out DIR"
    )
    _recipe(cfg, best["layers"]).write(stage / "tune.yaml", comment)
    return {
        "search": {
            "objective": cfg.objective,
            "max_drop": cfg.max_drop,
            "val_target": target,
            "dense_val_top1": dense_val,
            "layers": len(options),
            "slope_drop_per_kl": slope,
        },
        "candidates": candidates,
        "finalists": finalists,
        **({"timing": timing} if timing is not None else {}),
        "chosen": best["search"],
        "recipe": "tune.yaml",
        "bundle": "bundle",
    }


def _time_finalists(
    cfg: TuneConfig, passing: list[dict[str, Any]], latency: dict[str, Any], stage: Path
) -> dict[str, Any]:
    """Export each finalist within budget for the backend and time it side by side, round-robin, with the dense
    model's file and the uniform one the layers were priced with (every layer treated, its accuracy unchecked); each
    finalist gets its `latency` (p50 ms per batch, speed-up over float at the priced batch, top-1 on the backend)."""
    files = {f"{k} (every layer)" if k != "float" else k: Path(v) for k, v in latency["files"].items()}
    onnx_of: dict[str, Path] = {}
    for f in passing:
        bundle = str(f["bundle"])
        if bundle not in onnx_of:
            onnx_of[bundle] = export_for_backend(cfg, Path(bundle), Path(bundle + "-onnx"))
        files[f["search"]] = onnx_of[bundle]
    timed = time_side_by_side(cfg, files, stage / "latency" / "bench")
    base = timed["float"]["p50_ms"][cfg.latency_batch]
    for f in passing:
        t = timed[f["search"]]
        f["latency"] = {**t, "speedup_vs_float": base / t["p50_ms"][cfg.latency_batch]}
    return {"backend": cfg.backend, "rounds": cfg.rounds, "threads": cfg.threads, "models": timed,
            "speedup_vs_float": {k: base / v["p50_ms"][cfg.latency_batch] for k, v in timed.items()}}  # fmt: skip


def _summary(recipe: Recipe, total_value: float) -> dict[str, Any]:
    """What a recipe is: treatment counts, summed KL, objective value and its share of the most the table allows."""
    counts: dict[str, int] = {}
    for o in recipe.values():
        counts[o.treatment] = counts.get(o.treatment, 0) + 1
    return {
        "counts": counts,
        "sum_kl": recipe_kl(recipe),
        "value": recipe_value(recipe),
        "value_share": recipe_value(recipe) / total_value if total_value else 0.0,
    }


def _held_out_check(cfg: TuneConfig, bundle_path: str | Path, finalist: dict[str, Any], out: Path) -> dict[str, Any]:
    """Compress the bundle with the finalist's recipe (compress.run, as `compress --recipe` does) into `out` and judge
    its test top-1 drop against the budget."""
    recipe = _recipe(cfg, finalist["layers"])
    rec = compress_run(recipe.compress_config(cfg.eval_subset, cfg.data_root), bundle_path, out, overwrite=True)
    drop = rec["metrics"]["test_top1_drop"]
    return {
        "test_top1_before": rec["metrics"]["test_top1_before"],
        "test_top1": rec["metrics"]["test_top1_after"],
        "test_top1_drop": drop,
        "passed": drop <= cfg.max_drop,
        "weight_megabytes": weight_megabytes(load_bundle(out).model, finalist["layers"]),
        "bundle": out,
    }


def weight_megabytes(model: nn.Module, layers: dict[str, str]) -> dict[str, float]:
    """Weight storage of the Linear/Conv layers in megabytes: dense float32, and with the recipe's treatments
    (search.weight_bits), with the share of those weights in N:M."""
    dense = tuned = sparse = 0.0
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            n = mod.weight.numel()
            t = parse_treatment(layers.get(name, "float"))
            dense += n * 32
            tuned += n * weight_bits(t)
            sparse += n if t.nm else 0
            total += n
    return {"dense": dense / 8e6, "tuned": tuned / 8e6, "nm_share_of_all_weights": sparse / total if total else 0.0}


def write_plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """sensitivity.png: KL per layer (forward order) for each treatment, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.18), 4))
    for treatment in dict.fromkeys(r["treatment"] for r in rows):
        pts = [
            (layers.index(r["layer"]), max(r["kl"], 1e-9)) for r in rows if r["treatment"] == treatment and "kl" in r
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="", markersize=3, label=treatment)
    ax.set(yscale="log", xlabel="layer (forward order)", ylabel="KL(dense || treated), calibration images",
           title="cost of each treatment on one layer alone")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=100)
    plt.close(fig)
    return ["sensitivity.png"]


def write_front(found: dict[str, Any], cfg: TuneConfig, searches: tuple[str, ...], out: Path) -> str:
    """front.png: objective share against top-1 drop for every recipe measured (validation images) and every
    finalist (held-out test images), with the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in searches:
        pts = sorted((c["value_share"], c["val_top1_drop"]) for c in found["candidates"] if c["search"] == name)
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{name} (validation)")
    for f in found["finalists"]:
        if "test_top1_drop" in f:
            ax.plot(f["value_share"], f["test_top1_drop"], marker="*", markersize=12, linestyle="",
                    label=f"{f['search']} finalist (test)")  # fmt: skip
    ax.axhline(cfg.max_drop, color="red", linestyle="--", linewidth=1, label=f"--max-drop {cfg.max_drop}")
    ax.set(xlabel=f"share of the achievable {cfg.objective} objective", ylabel="top-1 drop (points)",
           title="per-layer recipes: objective against accuracy")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "front.png", dpi=100)
    plt.close(fig)
    return "front.png"
