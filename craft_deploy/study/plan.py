"""The cells of a study: which fine-tunes, diagnostics, compressions, recoveries and deployments it runs, as specs.

Cell ids (also their directories under `cells/`):

    <ft>/finetune                      ft = <optimizer label>-s<seed>, e.g. adam-s0, sam-0.05-s1
    <ft>/analyze                       lambda_max and the other diagnostics of the fine-tuned model
    <ft>/compress/<recipe>             one-shot compression of the fine-tuned bundle
    <ft>/recover/<recipe>              recovery fine-tuning (--init) of that compressed bundle, same optimizer
    <ft>/tunecomp-r<R>                 TuneComp from the pretrained model, same optimizer and seed
    <ft>/deploy/<backend>/<source>     export (when the backend needs it) + bench; source is fp32 or one of the above
    speed/<backend>                    one deployed model per recipe timed side by side, round-robin (bench --rounds)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from craft_deploy import CraftError
from craft_deploy.config import AnalyzeConfig, BenchConfig, ExportConfig, FinetuneConfig, StudyConfig
from craft_deploy.study.recipes import Recipe, expand_grid


@dataclass(frozen=True)
class FineTuning:
    """One optimizer entry x one seed."""

    label: str  # e.g. sam-0.05
    optimizer: str
    rho: float | None
    seed: int

    @property
    def id(self) -> str:
        return f"{self.label}-s{self.seed}"


def parse_optimizer(entry: str) -> tuple[str, str, float | None]:
    """'sam:0.05' -> ('sam-0.05', 'sam', 0.05); 'adam' -> ('adam', 'adam', None)."""
    from craft_deploy.finetune.optimizers import OPTIMIZERS

    name, _, rho_text = str(entry).strip().partition(":")
    if name not in OPTIMIZERS:
        raise CraftError(f"study optimizer {entry!r}: {name!r} is not one of {', '.join(OPTIMIZERS)} (write sam:0.05)")
    if not rho_text:
        return name, name, None
    try:
        rho = float(rho_text)
    except ValueError:
        raise CraftError(f"study optimizer {entry!r}: rho {rho_text!r} is not a number; write e.g. sam:0.05") from None
    if rho <= 0:
        raise CraftError(f"study optimizer {entry!r}: rho must be positive, e.g. sam:0.05")
    return f"{name}-{rho:g}", name, rho


def fine_tunings(cfg: StudyConfig) -> list[FineTuning]:
    runs = []
    for entry in cfg.optimizers:
        label, name, rho = parse_optimizer(entry)
        runs += [FineTuning(label, name, rho, seed) for seed in cfg.seeds]
    return runs


# Config fields added after studies were run, left out of cell specs while at their default, so that a cell's spec is
# the one it was and an older study resumes instead of refusing its finished cells.
ADDED_LATER = {"finetune": {"prune_schedule": "cubic", "rank_multiple": 1}, "bench": {"rounds": 1}}


def _without_later_defaults(conf: dict[str, Any], stage: str) -> dict[str, Any]:
    for key, default in ADDED_LATER[stage].items():
        if conf.get(key) == default:
            conf.pop(key)
    return conf


def finetune_config(cfg: StudyConfig, ft: FineTuning, **extra: Any) -> dict[str, Any]:
    """The full FinetuneConfig of a fine-tuning (every field, so a changed default is a changed cell), less threads
    (and less the fields of ADDED_LATER at their default)."""
    conf = FinetuneConfig(
        **{**cfg.finetune, **extra},
        model=cfg.model,
        data=cfg.data,
        data_root=cfg.data_root,
        pretrained=cfg.pretrained,
        optimizer=ft.optimizer,
        rho=ft.rho,
        seed=ft.seed,
        eval_subset=cfg.eval_subset,
        device=cfg.device,
    ).to_dict()
    conf.pop("threads")
    return _without_later_defaults(conf, "finetune")


def bundle_of(cell_id: str) -> str:
    """Where a cell's bundle lives, relative to the study's root."""
    return f"cells/{cell_id}/bundle"


def _spec(cell_id: str, kind: str, ft: FineTuning, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A cell spec in its JSON form (tuples as lists), so that it compares equal to the one its record stores."""
    spec = {"id": cell_id, "kind": kind, "ft": ft.id, "optimizer": ft.label, "seed": ft.seed, "config": config, **extra}
    return json.loads(json.dumps(spec))


def finetune_cells(cfg: StudyConfig) -> list[dict[str, Any]]:
    return [_spec(f"{ft.id}/finetune", "finetune", ft, finetune_config(cfg, ft)) for ft in fine_tunings(cfg)]


def recipes(cfg: StudyConfig) -> list[Recipe]:
    """The grid's recipes, each checked by the compress stage's own validation before any cell runs."""
    from craft_deploy.compress import from_flags

    out = expand_grid(cfg.grid, cfg.calibrators)
    for r in out:
        try:
            from_flags(**r.kwargs)
        except CraftError as e:
            raise CraftError(f"recipe {r.name!r}: {e}") from None
    return out


def grid_cells(cfg: StudyConfig, ready: set[str] | None = None) -> list[dict[str, Any]]:
    """Diagnostics and one-shot compression of every fine-tuning (of those in `ready`, the ones that finished)."""
    cells, grid = [], recipes(cfg)
    for ft in fine_tunings(cfg):
        if ready is not None and ft.id not in ready:
            continue
        source = bundle_of(f"{ft.id}/finetune")
        if cfg.analyze:
            conf = AnalyzeConfig(
                data_root=cfg.data_root, lambda_images=cfg.lambda_images, lambda_iters=cfg.lambda_iters
            )
            cells.append(_spec(f"{ft.id}/analyze", "analyze", ft, conf.to_dict(), source=source))
        for r in grid:
            conf = {**r.kwargs, "calib_samples": cfg.calib_samples, "eval_subset": cfg.eval_subset,
                    "data_root": cfg.data_root, "seed": 0}  # fmt: skip
            cells.append(_spec(f"{ft.id}/compress/{r.name}", "compress", ft, conf, source=source, recipe=r.name,
                               solver=r.solver))  # fmt: skip
    return cells


def training_cells(cfg: StudyConfig, worst: list[str], ready: set[str] | None = None) -> list[dict[str, Any]]:
    """Recovery of the `worst` recipes (the same ones for every fine-tuning, so the comparison stays paired) and
    TuneComp at each rank ratio, for the fine-tunings in `ready` (all when None)."""
    cells = []
    for ft in fine_tunings(cfg):
        if ready is not None and ft.id not in ready:
            continue
        for name in worst:
            conf = finetune_config(cfg, ft, epochs=cfg.recover_epochs)  # the --init bundle decides the model
            cells.append(_spec(f"{ft.id}/recover/{name}", "recover", ft, conf,
                               source=bundle_of(f"{ft.id}/compress/{name}"), recipe=name))  # fmt: skip
        for r in cfg.tunecomp:
            conf = finetune_config(cfg, ft, method="tunecomp", rank_ratio=r, prune_ratio=cfg.tunecomp_prune)
            cells.append(_spec(f"{ft.id}/tunecomp-r{r:g}", "tunecomp", ft, conf, recipe=f"tunecomp-r{r:g}"))
    return cells


def bench_config(cfg: StudyConfig, backend: str, **extra: Any) -> dict[str, Any]:
    """The BenchConfig of a study's bench on `backend` (less threads: the executor sets them; less the fields of
    ADDED_LATER at their default)."""
    from craft_deploy.study.cells import backend_parts

    name, precision = backend_parts(backend)
    if precision is not None:
        extra["precision"] = precision
    conf = BenchConfig(backend=name, batch_sizes=cfg.batch_sizes, eval_subset=cfg.eval_subset,
                       data_root=cfg.data_root, min_seconds=cfg.bench_seconds, **extra).to_dict()  # fmt: skip
    conf.pop("threads")
    return _without_later_defaults(conf, "bench")


def deploy_cell(cfg: StudyConfig, ft: FineTuning, backend: str, source_id: str, name: str, target: str):
    export = ExportConfig(target=target, batch_sizes=cfg.batch_sizes, data_root=cfg.data_root).to_dict()
    export.pop("format")  # chosen by what the backend needs (cells.export_format_for)
    bench = bench_config(cfg, backend)
    return _spec(f"{ft.id}/deploy/{backend}/{name}", "deploy", ft, {"export": export, "bench": bench},
                 source=bundle_of(source_id), recipe=name, backend=backend)  # fmt: skip


def deploy_cells(cfg: StudyConfig, finished: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every deployable finished cell on every backend: FP32, integer-kernel compressions, recoveries, TuneComp."""
    by_name = {r.name: r for r in recipes(cfg)}
    cells = []
    for backend in cfg.backends:
        for ft in fine_tunings(cfg):
            if finished.get(f"{ft.id}/finetune", {"status": "ok"}).get("status") != "ok":
                continue
            sources = [(f"{ft.id}/finetune", "fp32", "tensorrt")]
            for cell_id, rec in finished.items():
                if rec.get("status") != "ok" or rec["spec"]["ft"] != ft.id:
                    continue
                kind, recipe = rec["kind"], rec["spec"].get("recipe")
                if kind in ("compress", "recover"):
                    r = by_name.get(recipe)
                    if r is None or not r.deployable_on_integer_kernels():
                        continue
                    target = "ort-cpu" if r.kwargs.get("placement") == "ort-cpu" else "tensorrt"
                    name = recipe if kind == "compress" else f"recover-{recipe}"
                    sources.append((cell_id, name, target))
                elif kind == "tunecomp":
                    sources.append((cell_id, recipe, "tensorrt"))
            cells += [deploy_cell(cfg, ft, backend, s, n, t) for s, n, t in sources]
    return cells


def speed_cells(cfg: StudyConfig, finished: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backend, one round-robin timing of one deployed model per recipe: the baseline optimizer's lowest seed
    that deployed it (the optimizer changes the weights, not the graph), else the first optimizer's that did."""
    if cfg.speed_rounds < 1:
        return []
    from craft_deploy.study.cells import export_format_for

    runs = fine_tunings(cfg)
    baseline = runs[0].label
    order = {ft.id: i for i, ft in enumerate(sorted(runs, key=lambda f: (f.label != baseline, f.seed)))}
    cells = []
    for backend in cfg.backends:
        chosen: dict[str, tuple[int, str, dict[str, Any]]] = {}
        for cell_id, rec in finished.items():
            s = rec["spec"]
            if rec["kind"] != "deploy" or rec.get("status") != "ok" or s["backend"] != backend:
                continue
            rank = order.get(s["ft"], len(order))
            if s["recipe"] not in chosen or rank < chosen[s["recipe"]][0]:
                chosen[s["recipe"]] = (rank, cell_id, s)
        if len(chosen) < 2:
            continue  # nothing to compare side by side
        exported = export_format_for(backend) is not None
        models = [[row, f"cells/{cell_id}/export" if exported else s["source"]]
                  for row, (_, cell_id, s) in sorted(chosen.items())]  # fmt: skip
        bench = bench_config(cfg, backend, rounds=cfg.speed_rounds)
        cells.append(json.loads(json.dumps({
            "id": f"speed/{backend}", "kind": "speed", "ft": None, "optimizer": None, "seed": None,
            "backend": backend, "config": bench, "models": models,
            "cells": {row: cell_id for row, (_, cell_id, _) in sorted(chosen.items())},
        })))  # fmt: skip
    return cells
