"""craft-deploy study: a small real study on digits (2 optimizers x 2 seeds x a 3-recipe grid), killed and resumed,
its report checked against the cell records, run again with worker processes and on Ray; recipes, budget, bad input."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from craft_deploy import CraftError
from craft_deploy.cli.main import main
from craft_deploy.config import StudyConfig
from craft_deploy.study.budget import trim
from craft_deploy.study.recipes import expand_grid, parse_recipe
from craft_deploy.study.report import paired

SMALL = {
    "model": "test_efficientnet",
    "data": "digits",
    "pretrained": False,
    "optimizers": ["adam", "sam:0.05"],
    "seeds": [0, 1],
    "finetune": {"epochs": 1, "img_size": 32, "warmup_steps": 5},
    "eval_subset": None,
    "calib_samples": 64,
    "grid": ["w8a8+minmax", "0.5+magnitude+bn", "2:4+magnitude+bn"],
    "lambda_images": 16,
    "lambda_iters": 3,
    "recover_worst": 1,
    "tunecomp": [],
    "batch_sizes": [1],
    "bench_seconds": 0.05,
}
# 4 fine-tunes, 4 analyses, 12 compressions, 4 recoveries, 4 x (FP32 + w8a8 + 0.5 + 2:4 + recovery) deployments, and
# one round-robin timing of the 5 deployed recipes
SMALL_CELLS = 4 + 4 + 12 + 4 + 20 + 1


def _cells(root: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(root / "cells")): json.loads(p.read_text()) for p in root.glob("cells/**/cell.json")
    }


def _write(tmp_path: Path, cfg: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The small study started in a real process, killed after its first fine-tunes, then run again to the end."""
    tmp = tmp_path_factory.mktemp("study")
    config, out = _write(tmp, SMALL), tmp / "out"
    cmd = [sys.executable, "-m", "craft_deploy.cli.main", "study", str(config), "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("cells/*/finetune/cell.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: ((out / "cells" / k / "cell.json").stat().st_mtime_ns, v) for k, v in _cells(out).items()}
    result = CliRunner().invoke(main, ["study", str(config), "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, before


def test_a_killed_study_resumes_without_recomputing_finished_cells(killed_and_resumed):
    out, before = killed_and_resumed
    assert 2 <= len(before) < SMALL_CELLS  # killed part-way
    after = _cells(out)
    assert len(after) == SMALL_CELLS and all(c["status"] == "ok" for c in after.values())
    for cell_id, (mtime, rec) in before.items():
        assert (out / "cells" / cell_id / "cell.json").stat().st_mtime_ns == mtime
        assert after[cell_id] == rec
    study = json.loads((out / "study.json").read_text())
    assert len(study["cells"]) == SMALL_CELLS and study["trimmed"] == []


def test_report_numbers_are_the_cell_records(killed_and_resumed):
    """Table 2 and the paired verdicts, recomputed here from the cell.json files alone, match report.md/study.json."""
    out, _ = killed_and_resumed
    cells = _cells(out)
    report = (out / "report.md").read_text()
    fp32 = {c["spec"]["ft"]: c["metrics"]["test_top1"] for c in cells.values() if c["kind"] == "finetune"}
    for recipe in ("w8a8+minmax", "0.5+magnitude+bn", "2:4+magnitude+bn"):
        row = []
        for label in ("adam", "sam-0.05"):
            vals = {s: cells[f"{label}-s{s}/compress/{recipe}"]["metrics"]["test_top1"] for s in (0, 1)}
            drop = statistics.mean(fp32[f"{label}-s{s}"] - v for s, v in vals.items())
            row.append(f"{statistics.mean(vals.values()):.2f} ± {statistics.stdev(vals.values()):.2f} ({-drop:+.2f})")
        assert f"| {recipe} | {row[0]} | {row[1]} |" in report
    study = json.loads((out / "study.json").read_text())
    for recipe in ("w8a8+minmax", "2:4+magnitude+bn"):
        diffs = [
            cells[f"sam-0.05-s{s}/compress/{recipe}"]["metrics"]["test_top1"]
            - cells[f"adam-s{s}/compress/{recipe}"]["metrics"]["test_top1"]
            for s in (0, 1)
        ]
        verdict = study["report"]["verdicts"]["sam-0.05"][recipe]["top1"]
        assert verdict["mean"] == pytest.approx(statistics.mean(diffs))
        assert verdict["n"] == 2 and verdict["verdict"] in ("helps", "hurts", "cannot tell")
    worst = study["recovered"][0]  # the recipe with the largest mean drop is the one recovered
    drops = {
        r: statistics.mean(
            cells[f"{o}-s{s}/compress/{r}"]["metrics"]["test_top1_before"]
            - cells[f"{o}-s{s}/compress/{r}"]["metrics"]["test_top1"]
            for o in ("adam", "sam-0.05")
            for s in (0, 1)
        )
        for r in SMALL["grid"]
    }
    assert worst == max(drops, key=drops.get)
    pick = study["report"]["recommendation"]["ort-cpu"]
    assert pick["pytorch_drop"] <= SMALL.get("max_drop", 1.0)
    for png in study["report"]["plots"]:
        assert (out / png).stat().st_size > 1000


def test_recommended_commands_reproduce_the_cell(killed_and_resumed, tmp_path):
    """The compress command the report prints, run as written, gives the cell's own top-1."""
    out, _ = killed_and_resumed
    study = json.loads((out / "study.json").read_text())
    cells = _cells(out)
    ft = "adam-s0"
    spec = cells[f"{ft}/compress/2:4+magnitude+bn"]
    from craft_deploy.study.report import Results, commands

    pick = {"seeds": [0], "optimizer": "adam", "recipe": "2:4+magnitude+bn"}
    cmds = commands(Results(study), pick, "ort-cpu", {c["id"]: c["spec"] for c in study["cells"]})
    compress_cmd = next(c for c in cmds if c.startswith("craft-deploy compress")).split()[2:]
    compress_cmd[0] = str(out / "cells" / ft / "finetune" / "bundle")
    compress_cmd[compress_cmd.index("--out") + 1] = str(tmp_path / "c")
    result = CliRunner().invoke(main, ["compress", *compress_cmd])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "c" / "compress.json").read_text())
    assert again["metrics"]["test_top1_after"] == spec["metrics"]["test_top1"]
    finetune_cmd = next(c for c in cmds if c.startswith("craft-deploy finetune")).split()[2:]
    ctx = main.commands["finetune"].make_context("finetune", finetune_cmd)  # every flag it prints is accepted
    assert ctx.params["optimizer"] == "adam" and ctx.params["model"] == "test_efficientnet"


def test_the_recommendation_rests_on_the_round_robin_timing(killed_and_resumed):
    """One deployed model per recipe (the baseline's first seed) is timed side by side; the recommendation and the
    report's table quote those figures."""
    out, _ = killed_and_resumed
    cells = _cells(out)
    speed = cells["speed/ort-cpu"]
    rows = {"fp32", "w8a8+minmax", "0.5+magnitude+bn", "2:4+magnitude+bn"}
    recovered = json.loads((out / "study.json").read_text())["recovered"][0]
    assert set(speed["metrics"]["latency_ms"]) == rows | {f"recover-{recovered}"}
    for row, cell_id in speed["spec"]["cells"].items():
        assert cell_id == f"adam-s0/deploy/ort-cpu/{row}" and cells[cell_id]["status"] == "ok"
        passes = speed["metrics"]["round_p50_ms"][row]["1"]
        assert len(passes) == 5 and speed["metrics"]["latency_ms"][row]["1"] == sorted(passes)[2]
    pick = json.loads((out / "study.json").read_text())["report"]["recommendation"]["ort-cpu"]
    assert pick["latency_source"] == "round-robin"
    assert pick["latency_ms"] == speed["metrics"]["latency_ms"][pick["recipe"]]["1"]
    report = (out / "report.md").read_text()
    fp32 = speed["metrics"]["latency_ms"]["fp32"]["1"]
    assert f"| fp32 | {fp32:.2f} (" in report and "Side by side on ort-cpu (5 round-robin passes" in report


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_worker_processes_and_ray_compute_the_same_cells(executor, killed_and_resumed, tmp_path):
    if executor == "ray":
        pytest.importorskip("ray", reason="--executor ray needs the ray extra (pip install 'craft-deploy[ray]')")
    out, _ = killed_and_resumed
    cfg = {**SMALL, "seeds": [0], "recover_worst": 0, "analyze": False, "backends": []}
    args = ["study", str(_write(tmp_path, cfg)), "--jobs", "2", "--threads", "2", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--executor", executor])
    assert result.exit_code == 0, result.output
    parallel, serial = _cells(tmp_path / "o"), _cells(out)
    assert len(parallel) == 2 + 6
    for cell_id, rec in parallel.items():
        assert rec["status"] == "ok" and rec["threads"] == 1
        assert rec["metrics"]["test_top1"] == serial[cell_id]["metrics"]["test_top1"], cell_id


def test_a_failing_cell_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    import craft_deploy.compress as compress_stage
    from craft_deploy import study

    real = compress_stage.run

    def flaky(cfg, bundle, out, overwrite=False):
        if cfg.methods[0].method_name == "prune":
            raise RuntimeError("solver diverged")
        return real(cfg, bundle, out, overwrite)

    monkeypatch.setattr(compress_stage, "run", flaky)
    cfg = StudyConfig.from_dict({**SMALL, "optimizers": ["adam"], "seeds": [0], "recover_worst": 0,
                                 "analyze": False, "backends": [], "threads": 1})  # fmt: skip
    rec = study.run(cfg, tmp_path / "o")
    status = {c["id"]: c["status"] for c in rec["cells"]}
    assert status == {
        "adam-s0/finetune": "ok",
        "adam-s0/compress/w8a8+minmax": "ok",
        "adam-s0/compress/0.5+magnitude+bn": "error",
        "adam-s0/compress/2:4+magnitude+bn": "error",
    }
    failed = next(c for c in rec["cells"] if c["status"] == "error")
    assert "RuntimeError: solver diverged" in failed["error"]
    assert "solver diverged" in (tmp_path / "o" / "report.md").read_text()
    monkeypatch.setattr(compress_stage, "run", real)
    again = study.run(cfg, tmp_path / "o")  # failures stay failures unless asked
    assert sum(c["status"] == "error" for c in again["cells"]) == 2
    again = study.run(cfg, tmp_path / "o", retry_failed=True)
    assert all(c["status"] == "ok" for c in again["cells"])


def test_a_finished_finetune_in_place_is_adopted_and_one_with_other_settings_is_refused(tmp_path):
    """Fine-tunes run beforehand with `craft-deploy finetune` into the cells' directories: the same settings are adopted
    (not retrained), other settings fail that cell, and nothing is compressed from the refused bundle."""
    cfg = {**SMALL, "grid": ["w8a8+minmax"], "recover_worst": 0, "analyze": False, "backends": [], "threads": 1}
    out = tmp_path / "o"
    ft = ["--model", "test_efficientnet", "--data", "digits", "--no-pretrained", "--img-size", "32",
          "--warmup-steps", "5", "--threads", "1"]  # fmt: skip
    runner = CliRunner()
    for label, extra in (("adam-s0", ["--epochs", "1"]), ("adam-s1", ["--epochs", "2", "--seed", "1"])):
        args = ["finetune", *ft, *extra, "--out", str(out / "cells" / label / "finetune" / "bundle")]
        assert runner.invoke(main, args).exit_code == 0
    before = (out / "cells/adam-s0/finetune/bundle/model.safetensors").stat().st_mtime_ns
    result = runner.invoke(main, ["study", str(_write(tmp_path, {**cfg, "optimizers": ["adam"]})), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cells = _cells(out)
    assert cells["adam-s0/finetune"]["metrics"]["reused"] is True
    assert (out / "cells/adam-s0/finetune/bundle/model.safetensors").stat().st_mtime_ns == before
    assert cells["adam-s1/finetune"]["status"] == "error" and "epochs: 2" in cells["adam-s1/finetune"]["error"]
    assert "adam-s0/compress/w8a8+minmax" in cells and "adam-s1/compress/w8a8+minmax" not in cells


def test_a_budget_trims_in_the_stated_order(tmp_path):
    """With 0.01 minutes only what is never dropped runs: fine-tunes, the first recipe, FP32 deployments of seed 0, and
    the round-robin timing of what was deployed."""
    cfg = {**SMALL, "recover_worst": 1, "budget_minutes": 0.01, "threads": 1}
    result = CliRunner().invoke(main, ["study", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    ran = set(_cells(tmp_path / "o"))
    assert {c for c in ran if "/finetune" not in c} == {
        "adam-s0/compress/w8a8+minmax", "adam-s1/compress/w8a8+minmax", "sam-0.05-s0/compress/w8a8+minmax",
        "sam-0.05-s1/compress/w8a8+minmax", "adam-s0/deploy/ort-cpu/fp32", "sam-0.05-s0/deploy/ort-cpu/fp32",
        "adam-s0/deploy/ort-cpu/w8a8+minmax", "sam-0.05-s0/deploy/ort-cpu/w8a8+minmax",
        "speed/ort-cpu",  # the round-robin timing of what was deployed is never dropped
    }  # fmt: skip
    trimmed = json.loads((tmp_path / "o" / "study.json").read_text())["trimmed"]
    assert {"id": "adam-s1/analyze", "reason": "budget"} in trimmed


def test_trim_drops_later_seeds_deployments_first():
    def spec(i, kind, seed, recipe=None):
        return {"id": i, "kind": kind, "seed": seed, "recipe": recipe}

    pending = [spec("d0", "deploy", 0, "fp32"), spec("d1", "deploy", 1, "fp32"), spec("t1", "tunecomp", 1),
               spec("c0", "compress", 0, "b"), spec("r1", "recover", 1)]  # fmt: skip
    finished = [{"status": "ok", "seconds": 10.0, "spec": {"kind": k}, "metrics": {}} for k in
                ("deploy", "tunecomp", "compress", "recover")]  # fmt: skip
    kept, dropped, total = trim(pending, finished, seconds_left=25.0, first_seed=0, grid=["a", "b"])
    assert [s["id"] for s in dropped] == ["d1", "t1", "r1"] and total == 20.0
    assert [s["id"] for s in kept] == ["d0", "c0"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "docs").glob("study-*.yaml")), ids=str)
def test_the_study_configs_in_docs_plan_without_error(path):
    """Every study config the docs hand out loads, and its optimizers, recipes and backends pass the study's checks."""
    from craft_deploy.study import load_study_config, plan

    cfg = load_study_config(path)
    assert len(plan.finetune_cells(cfg)) == len(cfg.optimizers) * len(cfg.seeds)
    assert plan.recipes(cfg)


def test_recipes_parse_into_compress_flags():
    (r,) = parse_recipe("bn+W8A8+mse+2:4+sparsegpt")
    assert r.name == "2:4+sparsegpt+w8a8+mse+bn"
    assert r.cli_flags() == ["--sparsity", "2:4", "--prune-method", "sparsegpt", "--quant", "w8a8",
                             "--calib-method", "mse", "--bn-recalibrate"]  # fmt: skip
    assert [x.name for x in parse_recipe("w4a16+gptq", ("mse", "minmax"))] == ["w4a16+mse+gptq", "w4a16+minmax+gptq"]
    assert [x.name for x in expand_grid(("w8a8", "w8a8+mse", "rank0.25"), ("mse",))] == ["w8a8+mse", "rank0.25"]
    assert parse_recipe("0.7+wanda")[0].kwargs == {"sparsity": "0.7", "prune_method": "wanda"}
    assert parse_recipe("tensor+w8a8+minmax")[0].cli_flags()[-2:] == ["--weight-granularity", "tensor"]
    assert parse_recipe("w8a8+mse")[0].deployable_on_integer_kernels()
    assert not parse_recipe("w4a16+mse")[0].deployable_on_integer_kernels()
    assert not parse_recipe("w4a8+mse")[0].deployable_on_integer_kernels()  # INT4 conv weights do not export
    assert parse_recipe("w7a8+mse+ort-cpu")[0].deployable_on_integer_kernels()
    for bad, says in (("w8a8+foo", "unknown token 'foo'"), ("w8a8+w4a4", "second time"), ("mse", "neither"),
                      ("wanda", "neither"), ("0.5+gptq", "without quantizing"), ("2:4+tensor", "without quantizing"),
                      ("w9a8", "weight bits"),
                      ("w8a8++bn", "empty token")):  # fmt: skip
        with pytest.raises(CraftError, match=says):
            parse_recipe(bad)


def test_paired_verdicts():
    assert paired([1.0, 1.2, 0.9])["verdict"] == "helps"
    assert paired([-1.0, -1.2, -0.9])["verdict"] == "hurts"
    assert paired([1.0, -1.0, 0.5])["verdict"] == "cannot tell"
    assert paired([3.0])["verdict"] == "cannot tell"
    ci = paired([1.0, 2.0, 3.0])["ci"]  # mean 2, sd 1, n 3: t(0.975, 2) = 4.303
    assert ci == pytest.approx([2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5], abs=1e-3)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--grid", "w8a8+fancy"], "unknown token 'fancy'"),
        (["--optimizers", "adam,lion"], "'lion' is not one of"),
        (["--optimizers", "adam,sam:big"], "rho 'big' is not a number"),
        (["--grid", "fp8+ort-cpu"], "recipe 'fp8+mse+ort-cpu'"),
        (["--backends", "nope"], "unknown backend 'nope'"),
        (["--seeds", "0,0"], "must not repeat"),
        (["--executor", "ray", "--jobs", "0"], "--jobs and --threads must be >= 1"),
    ],
)
def test_bad_study_input_is_one_line_exit_2_and_writes_nothing(args, says, tmp_path):
    result = CliRunner().invoke(main, ["study", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_bad_study_files_and_changed_cells_are_refused(tmp_path, killed_and_resumed):
    runner = CliRunner()
    (tmp_path / "list.yaml").write_text("- adam\n")
    (tmp_path / "typo.yaml").write_text("optimisers: [adam]\n")
    _write(tmp_path, {**SMALL, "recover": ["w4a4"]}, "recover.yaml")
    for name, says in (("list.yaml", "must be a mapping"), ("typo.yaml", "has no field(s) ['optimisers']"),
                       ("missing.yaml", "does not exist"),
                       ("recover.yaml", "recover entry 'w4a4' is not a recipe of the grid")):  # fmt: skip
        result = runner.invoke(main, ["study", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and says in result.output, result.output
    out, _ = killed_and_resumed
    changed = _write(tmp_path, {**SMALL, "calib_samples": 32})
    result = runner.invoke(main, ["study", str(changed), "--out", str(out)])
    assert result.exit_code == 2 and "was computed with other settings (config differ)" in result.output


def test_the_fastest_pick_across_backends_is_named_with_its_caveat():
    from craft_deploy.study.report import across_backends

    picks = {
        "ort-cpu": {"recipe": "w7a8+mse+ort-cpu+bn", "optimizer": "adam", "batch": 1, "latency_ms": 0.70},
        "openvino": {"recipe": "w8a8+mse+bn", "optimizer": "sam:0.05", "batch": 1, "latency_ms": 0.55},
    }
    lines, across = across_backends(picks)
    assert across["backend"] == "openvino" and across["recipe"] == "w8a8+mse+bn"
    assert across["slower_by"] == {"ort-cpu": pytest.approx(0.70 / 0.55)}
    assert "**openvino**" in lines[0] and "1.27x slower" in lines[0] and "side by side" in lines[0]
    assert across_backends({"ort-cpu": picks["ort-cpu"]}) == ([], None)  # one backend: nothing to compare
    assert across_backends({**picks, "ort-cpu": {**picks["ort-cpu"], "batch": 16}}) == ([], None)  # unlike batches
