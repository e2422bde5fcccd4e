"""`craft-deploy study`: fine-tunings x seeds x a compression grid, run as resumable cells, then one report.

Phases, each a set of independent cells (craft_deploy.study.plan):
1. fine-tune every optimizer x seed (a finished fine-tune with the same settings already in place is adopted);
2. diagnostics (lambda_max) and one-shot compression of every fine-tuning with every grid recipe;
3. recovery fine-tuning of the `recover_worst` recipes with the largest mean drop, and TuneComp;
4. export + bench of every deployable cell on every backend;
5. per backend, one deployed model per recipe timed side by side, round-robin (`speed_rounds` passes), so that the
   latency ratios the recommendation rests on are not the drift between cells benched minutes apart.
Then study.json (every cell's record) and report.md with its plots (craft_deploy.study.report).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_json, read_json
from craft_deploy.config import StudyConfig
from craft_deploy.records import environment
from craft_deploy.study import plan
from craft_deploy.study.budget import PRIOR_SECONDS, estimator, trim
from craft_deploy.study.cells import read_cell
from craft_deploy.study.executors import execute, threads_per_cell
from craft_deploy.study.recipes import parse_recipe

__all__ = ["load_study_config", "run"]

STUDY_SCHEMA = 1
DERIVED = ("speed",)  # cell kinds computed from other cells' outputs, re-run when those change


def load_study_config(path: str | Path, **overrides: Any) -> StudyConfig:
    """A StudyConfig from a YAML file (its keys are StudyConfig fields), with command-line `overrides` on top; an
    override of `finetune` is merged into the file's `finetune:` settings key by key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CraftError(f"study config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CraftError(f"study config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CraftError(f"study config {path} must be a mapping of StudyConfig fields, got {type(data).__name__}")
    if isinstance(overrides.get("finetune"), dict) and isinstance(data.get("finetune"), dict):
        overrides = {**overrides, "finetune": {**data["finetune"], **overrides["finetune"]}}
    return StudyConfig.from_dict({**data, **overrides})


class _Run:
    """The state of one invocation: finished records, the budget clock, the progress bar."""

    def __init__(self, cfg: StudyConfig, root: Path, retry_failed: bool, ray_address: str | None, grid: list[str]):
        self.cfg, self.root, self.retry_failed, self.ray_address = cfg, root, retry_failed, ray_address
        self.grid = grid  # recipe names in grid order: the budget drops them from the end
        self.records: dict[str, dict[str, Any]] = {}
        self.trimmed: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.bar = tqdm(desc="study cells", unit="cell", disable=None)

    def seconds_left(self) -> float:
        if self.cfg.budget_minutes is None:
            return float("inf")
        return self.cfg.budget_minutes * 60 - (time.perf_counter() - self.t0)

    def pending(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The specs without a finished record; a finished record must come from the same spec."""
        todo = []
        for spec in specs:
            rec = read_cell(self.root, spec["id"])
            if rec is not None and rec["spec"] != spec and spec["kind"] in DERIVED:
                todo.append(spec)  # built from other cells' outputs: a changed set of them is measured again
                continue
            if rec is not None and rec["spec"] != spec:
                diff = sorted(k for k in set(spec) | set(rec["spec"]) if spec.get(k) != rec["spec"].get(k))
                raise CraftError(
                    f"cell {spec['id']} in {self.root} was computed with other settings ({', '.join(diff)} differ); "
                    "use another --out for a changed study, or remove that cell's directory to recompute it"
                )
            if rec is None or (rec["status"] == "error" and self.retry_failed):
                todo.append(spec)
            else:
                self.records[spec["id"]] = rec
        return todo

    def phase(self, specs: list[dict[str, Any]], future: list[dict[str, Any]] = (), budgeted: bool = True) -> None:
        """Run the unfinished `specs`, after trimming them (and the projected `future` cells) to the budget."""
        todo = self.pending(specs)
        if self.cfg.budget_minutes is not None and todo and budgeted:
            first = self.cfg.seeds[0]
            future = [f for f in future if f["id"] not in self.records]
            cell_seconds_left = self.seconds_left() * self.cfg.jobs  # N jobs spend N cell-seconds per second
            kept, dropped, _ = trim(
                todo + list(future), list(self.records.values()), cell_seconds_left, first, self.grid
            )
            now = {s["id"] for s in todo}
            kept_ids = {s["id"] for s in kept}
            self.trimmed += [{"id": s["id"], "reason": "budget"} for s in dropped if s["id"] in now]
            todo = [s for s in todo if s["id"] in kept_ids]
        self.bar.total = (self.bar.total or 0) + len(todo)
        self.bar.refresh()
        for rec in execute(todo, str(self.root), self.cfg.executor, self.cfg.jobs, self.cfg.threads, self.ray_address):
            self.records[rec["id"]] = rec
            self.bar.set_postfix_str(f"{rec['id']} {rec['status']}", refresh=False)
            self.bar.update()


def worst_recipes(cfg: StudyConfig, records: dict[str, dict[str, Any]]) -> list[str]:
    """The `recover_worst` recipes with the largest mean one-shot drop over every fine-tuning (the same for all), then
    those `recover` names that ran."""
    drops: dict[str, list[float]] = {}
    for rec in records.values():
        if rec["kind"] == "compress" and rec["status"] == "ok":
            m = rec["metrics"]
            drops.setdefault(rec["spec"]["recipe"], []).append(m["test_top1_before"] - m["test_top1"])
    ranked = sorted(drops, key=lambda name: -statistics.mean(drops[name]))
    chosen = ranked[: cfg.recover_worst]
    for entry in cfg.recover:  # asked for by name (grid spelling), whatever its drop
        chosen += [r.name for r in parse_recipe(entry, cfg.calibrators) if r.name in drops and r.name not in chosen]
    return chosen


def _projected_deploys(cfg: StudyConfig, grid: list[str]) -> list[dict[str, Any]]:
    """The deployments phase 4 would run if every cell before it succeeds (for the budget's estimate)."""
    fake = {}
    for ft in plan.fine_tunings(cfg):
        for name in grid:
            fake[f"{ft.id}/compress/{name}"] = {
                "status": "ok",
                "kind": "compress",
                "spec": {"ft": ft.id, "recipe": name},
            }
        for rr in cfg.tunecomp:
            fake[f"{ft.id}/tunecomp-r{rr:g}"] = {"status": "ok", "kind": "tunecomp",
                                                  "spec": {"ft": ft.id, "recipe": f"tunecomp-r{rr:g}"}}  # fmt: skip
    return plan.deploy_cells(cfg, fake)


def run(
    cfg: StudyConfig,
    out: str | Path,
    overwrite: bool = False,
    retry_failed: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study into `out`; write study.json and report.md; return the study record."""
    from craft_deploy.bench.backends import get_backend
    from craft_deploy.study.cells import backend_parts
    from craft_deploy.study.report import write_report

    plan.fine_tunings(cfg)  # bad optimizer names, recipes and backends fail before any work
    grid = [r.name for r in plan.recipes(cfg)]
    for backend in cfg.backends:  # `name` or `name@precision` (openvino@bf16): both checked before any work
        get_backend(backend_parts(backend)[0])
        plan.bench_config(cfg, backend)
    names = set(grid)
    for entry in cfg.recover:
        if any(r.name not in names for r in parse_recipe(entry, cfg.calibrators)):
            raise CraftError(f"recover entry {entry!r} is not a recipe of the grid ({', '.join(sorted(names))})")

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise CraftError(f"--out {root} exists and is a file; give a directory path")
    previous = root / "study.json"
    if previous.is_file() and not overwrite:
        before = read_json(previous, "study record").get("config", {})
        if before.get("model") != cfg.model or before.get("data") != cfg.data:
            raise CraftError(
                f"{root} holds a study of {before.get('model')} on {before.get('data')}, not {cfg.model} on {cfg.data}"
                "; use another --out (or --overwrite to start over)"
            )
    elif root.is_dir() and any(root.iterdir()) and not overwrite and not (root / "cells").is_dir():
        raise CraftError(f"--out {root} exists and is not a study; choose another path or pass --overwrite")
    if overwrite and root.is_dir():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    state = _Run(cfg, root, retry_failed, ray_address, grid)
    try:
        grid_future = plan.training_cells(cfg, grid[: cfg.recover_worst + len(cfg.recover)])
        state.phase(plan.finetune_cells(cfg))
        ready = {r["spec"]["ft"] for r in state.records.values() if r["kind"] == "finetune" and r["status"] == "ok"}
        state.phase(plan.grid_cells(cfg, ready), future=grid_future + _projected_deploys(cfg, grid))
        worst = worst_recipes(cfg, state.records)
        state.phase(plan.training_cells(cfg, worst, ready), future=_projected_deploys(cfg, grid))
        state.phase(plan.deploy_cells(cfg, state.records))
        state.phase(plan.speed_cells(cfg, state.records), budgeted=False)  # minutes at most; what the pick rests on
    finally:
        state.bar.close()
    estimate = estimator(list(state.records.values()))
    record = {
        "schema": STUDY_SCHEMA,
        "stage": "study",
        "config": cfg.to_dict(),
        "baseline": plan.fine_tunings(cfg)[0].label,
        "recovered": worst,
        "cells": [state.records[k] for k in sorted(state.records)],
        "trimmed": state.trimmed,
        "timings": {
            "this_run_seconds": time.perf_counter() - state.t0,
            "cell_seconds": sum(r.get("seconds", 0.0) for r in state.records.values()),
            "threads_per_cell": threads_per_cell(cfg.threads, cfg.jobs),
            "estimate_seconds_by_kind": {
                k: estimate({"kind": k.split("-")[0], "solver": k.endswith("solver")}) for k in PRIOR_SECONDS
            },
        },
        "environment": environment(),
    }
    record["report"] = write_report(record, root)
    atomic_write_json(root / "study.json", record)
    return record
