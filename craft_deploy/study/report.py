"""The study's report: report.md (the CrAFT paper's Table 2 layout, the paired verdict on each optimizer against the
baseline, diagnostics, the recommendation with its commands) and its plots. Every number is read from the cell
records in study.json; nothing here is measured or typed by hand."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from craft_deploy.config import FinetuneConfig
from craft_deploy.study.recipes import expand_grid, parse_recipe

FP32 = "FP32"
LATENCY_NOISE = 0.20  # these VMs drift 15-30% for minutes: the tie band between cells benched one by one
ROUND_ROBIN_NOISE = 0.05  # the tie band between recipes timed side by side in one run (the speed cell)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(diffs: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with a Student-t confidence interval, and the verdict it supports: `helps` when the
    whole interval is above 0, `hurts` when below, `cannot tell` otherwise (always, with fewer than 2 pairs)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None, "verdict": "no pairs"}
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": 1, "mean": mean, "ci": None, "verdict": "cannot tell"}
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "cannot tell"
    return {"n": n, "mean": mean, "ci": [lo, hi], "verdict": verdict}


class Results:
    """The cell records arranged by (optimizer label, row) -> {seed: value}."""

    def __init__(self, record: dict[str, Any]):
        ok = [c for c in record["cells"] if c["status"] == "ok"]
        self.optimizers = list(
            dict.fromkeys(c["spec"]["optimizer"] for c in record["cells"] if c["kind"] == "finetune")
        )
        self.baseline = record["baseline"]
        self.top1: dict[tuple[str, str], dict[int, float]] = {}
        self.lambdas: dict[str, dict[int, float]] = {}
        self.deployed: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}  # (backend, optimizer, row)
        self.speed: dict[str, dict[str, Any]] = {}  # backend -> the round-robin timing of one model per recipe
        self.rows: list[str] = [FP32]
        for c in ok:
            s, m = c["spec"], c["metrics"]
            if c["kind"] == "finetune":  # FP32 top-1 (PyTorch, the study's test images)
                self._put((s["optimizer"], FP32), s["seed"], m["test_top1"])
            elif c["kind"] == "compress":
                self._put((s["optimizer"], s["recipe"]), s["seed"], m["test_top1"])
            elif c["kind"] == "recover":
                self._put((s["optimizer"], f"{s['recipe']} + recovery"), s["seed"], m["test_top1"])
            elif c["kind"] == "tunecomp":
                self._put((s["optimizer"], s["recipe"]), s["seed"], m["test_top1"])
            elif c["kind"] == "analyze":
                self.lambdas.setdefault(s["optimizer"], {})[s["seed"]] = m["lambda_max"]
            elif c["kind"] == "deploy":
                self.deployed.setdefault((s["backend"], s["optimizer"], s["recipe"]), {})[s["seed"]] = m
            elif c["kind"] == "speed":  # how many passes is the spec's
                self.speed[s["backend"]] = {**m, "rounds": s["config"]["rounds"]}
        cfg = record["config"]
        grid = [r.name for r in expand_grid(tuple(cfg["grid"]), tuple(cfg["calibrators"]))]
        self.rows += [r for r in grid if any(r == k[1] for k in self.top1)]
        self.rows += sorted({k[1] for k in self.top1} - set(self.rows))

    def latency(self, backend: str, row: str, batch: int) -> float | None:
        """The round-robin p50 of a deployed recipe on a backend, when the study timed it side by side."""
        return self.speed.get(backend, {}).get("latency_ms", {}).get(row, {}).get(str(batch))

    def _put(self, key: tuple[str, str], seed: int, value: float) -> None:
        self.top1.setdefault(key, {})[seed] = value

    def drops(self, optimizer: str, row: str) -> dict[int, float]:
        """Per seed: that seed's FP32 top-1 minus the row's."""
        fp32 = self.top1.get((optimizer, FP32), {})
        return {s: fp32[s] - v for s, v in self.top1.get((optimizer, row), {}).items() if s in fp32}

    def comparison(self, optimizer: str, row: str) -> dict[str, Any]:
        """Paired over seeds: top-1 and drop of `optimizer` minus the baseline's, on the same seed's test images."""
        a, b = self.top1.get((optimizer, row), {}), self.top1.get((self.baseline, row), {})
        seeds = sorted(set(a) & set(b))
        da, db = self.drops(optimizer, row), self.drops(self.baseline, row)
        return {
            "seeds": seeds,
            "top1": paired([a[s] - b[s] for s in seeds]),
            "drop": paired([da[s] - db[s] for s in seeds if s in da and s in db]),
        }


def _fmt(vals: dict[int, float], drops: dict[int, float] | None = None) -> str:
    if not vals:
        return "-"
    m, sd = mean_std(list(vals.values()))
    text = f"{m:.2f} ± {sd:.2f}" if len(vals) > 1 else f"{m:.2f}"
    if drops:
        text += f" ({-statistics.mean(drops.values()):+.2f})"
    return text


def table2(res: Results) -> list[str]:
    lines = ["| recipe | " + " | ".join(res.optimizers) + " |", "|---|" + "---|" * len(res.optimizers)]
    for row in res.rows:
        cells = [_fmt(res.top1.get((o, row), {}), None if row == FP32 else res.drops(o, row)) for o in res.optimizers]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def verdicts(res: Results) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    out: dict[str, Any] = {}
    for o in res.optimizers:
        if o == res.baseline:
            continue
        lines += [
            f"### {o} against {res.baseline}",
            "",
            "| recipe | pairs | Δ top-1, mean [95% CI] | Δ drop, mean [95% CI] | verdict |",
            "|---|---|---|---|---|",
        ]
        rows = {}
        for row in res.rows:
            c = res.comparison(o, row)
            rows[row] = c
            t, d = c["top1"], c["drop"]
            lines.append(f"| {row} | {t['n']} | {_ci(t)} | {'' if row == FP32 else _ci(d)} | {t['verdict']} |")
        out[o] = rows
        counts = {v: [r for r, c in rows.items() if c["top1"]["verdict"] == v] for v in ("helps", "hurts")}
        undecided = [r for r, c in rows.items() if c["top1"]["verdict"] not in ("helps", "hurts")]
        lines += ["", f"**Verdict, {o} vs {res.baseline}** (paired over seeds, 95% t-interval on top-1): helps in "
                  f"{len(counts['helps'])} of {len(rows)} rows ({', '.join(counts['helps']) or 'none'}); hurts in "
                  f"{len(counts['hurts'])} ({', '.join(counts['hurts']) or 'none'}); the data cannot tell in "
                  f"{len(undecided)}. At 95% per row, about {len(rows) / 20:.1f} of {len(rows)} rows would show a "
                  "verdict by chance alone: read single rows with that in mind.", ""]  # fmt: skip
    if len(res.optimizers) < 2:
        lines += [f"Only one fine-tuning optimizer ({res.baseline}): nothing to compare it with; add e.g. sam:0.05 to "
                  "`optimizers`.", ""]  # fmt: skip
    return lines, out


def _ci(p: dict[str, Any]) -> str:
    if p["mean"] is None:
        return "-"
    if p["ci"] is None:
        return f"{p['mean']:+.2f} [one pair]"
    return f"{p['mean']:+.2f} [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}]"


def recommendation(res: Results, max_drop: float, specs: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Per backend: the fastest deployed recipe that some optimizer keeps within `max_drop` of its FP32 (mean over
    every seed in PyTorch, and over the deployed seeds on the backend), with the most accurate such optimizer.

    A recipe's latency is its p50 in the study's round-robin timing (the speed cell: one deployed model per recipe,
    side by side) when there is one; else the median over all its deployed cells, every optimizer and seed together
    (the optimizer changes weights, not the graph). Recipes within ROUND_ROBIN_NOISE (LATENCY_NOISE for pooled cells)
    of the fastest count as equally fast, and the most accurate of them is recommended."""
    from craft_deploy.study.cells import backend_parts

    lines: list[str] = []
    picks: dict[str, Any] = {}
    for backend in sorted({k[0] for k in res.deployed}):
        cands, latency = [], {}
        for (b, o, row), by_seed in res.deployed.items():
            if b != backend:
                continue
            batch = min(int(k) for k in next(iter(by_seed.values()))["latency_ms"])
            latency.setdefault(row, []).extend(m["latency_ms"][str(batch)] for m in by_seed.values())
            base = {s: m["top1"] for s, m in res.deployed.get((b, o, "fp32"), {}).items()}
            if backend_parts(backend)[1]:  # a precision hint (openvino@bf16): its FP32 row is not FP32; PyTorch's is
                base = res.top1.get((o, FP32), {})
            back_drops = [base[s] - m["top1"] for s, m in by_seed.items() if s in base]
            torch_row = _torch_row(row)
            torch_drops = [0.0] * len(res.top1.get((o, FP32), {})) if torch_row == FP32 else list(
                res.drops(o, torch_row).values())  # fmt: skip
            cands.append({
                "optimizer": o, "recipe": row, "batch": batch,
                "backend_top1": statistics.mean(m["top1"] for m in by_seed.values()),
                "backend_drop": statistics.mean(back_drops) if back_drops else None,
                "pytorch_drop": statistics.mean(torch_drops) if torch_drops else None,
                "pytorch_seeds": len(torch_drops), "seeds": sorted(by_seed),
            })  # fmt: skip
        timed = all(res.latency(backend, c["recipe"], c["batch"]) is not None for c in cands)
        for c in cands:  # side by side when the speed cell timed every recipe, else pooled over the deployed cells
            rr = res.latency(backend, c["recipe"], c["batch"]) if timed else None
            c["latency_ms"] = rr if rr is not None else statistics.median(latency[c["recipe"]])
            c["latency_source"] = "round-robin" if rr is not None else f"median of {len(latency[c['recipe']])} cells"
        ok = [c for c in cands if c["pytorch_drop"] is not None and c["pytorch_drop"] <= max_drop
              and (c["backend_drop"] is None or c["backend_drop"] <= max_drop)]  # fmt: skip
        fp32 = [c["latency_ms"] for c in cands if c["recipe"] == "fp32"]
        fp32_lat = fp32[0] if fp32 else None
        band = ROUND_ROBIN_NOISE if timed else LATENCY_NOISE
        if not ok:
            lines.append(f"- **{backend}**: no deployed recipe is within {max_drop:g} point(s) of FP32.")
            continue
        fastest = min(c["latency_ms"] for c in ok)
        tied = [c for c in ok if c["latency_ms"] <= fastest * (1 + band)]  # within the noise: not slower
        best = max(tied, key=lambda c: (-c["pytorch_drop"], c["backend_top1"]))
        speed = f", {fp32_lat / best['latency_ms']:.2f}x FP32's {fp32_lat:.2f} ms" if fp32_lat else ""
        best["commands"] = commands(res, best, backend, specs)
        picks[backend] = best
        lines += [
            f"- **{backend}**: **{best['recipe']}, {best['optimizer']} fine-tuning**: {best['latency_ms']:.2f} ms at "
            f"batch {best['batch']} ({best['latency_source']}){speed}; top-1 on {backend} "
            f"{best['backend_top1']:.2f}, mean drop from FP32 {best['pytorch_drop']:.2f} over "
            f"{best['pytorch_seeds']} seed(s) in PyTorch. {len(ok)} of {len(cands)} deployed (optimizer, recipe) pairs "
            f"are within the budget; {len(tied)} of them within {band:.0%} of the fastest "
            f"({fastest:.2f} ms), of which this is the most accurate. To reproduce (seed {best['seeds'][0]}):",
            "",
            "```",
            *best["commands"],
            "```",
        ]
    return lines, picks


def across_backends(picks: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """The fastest of the per-backend picks, where two or more backends were timed at the same batch size.

    Each backend's latencies come from its own cells (its own round-robin speed cell at best), minutes apart from the
    other backend's, so the comparison carries the drift of these VMs: the line says so, and how large the gap is."""
    batches = {p["batch"] for p in picks.values()}
    if len(picks) < 2 or len(batches) != 1:
        return [], None
    order = sorted(picks.items(), key=lambda kv: kv[1]["latency_ms"])
    (fast, best), rest = order[0], order[1:]
    others = "; ".join(
        f"{b} ({p['recipe']}) {p['latency_ms']:.2f} ms, {p['latency_ms'] / best['latency_ms']:.2f}x slower"
        for b, p in rest
    )
    lines = [
        f"- **across backends**: **{fast}** with {best['recipe']} ({best['optimizer']} fine-tuning) is the fastest "
        f"pick at batch {best['batch']}: {best['latency_ms']:.2f} ms; {others}. Each backend was timed in its own "
        "cells, minutes apart: a gap under about 30% is within these VMs' drift, so time the finalists side by side "
        "(benchmarks/cpu_runtimes.py) before choosing on it."
    ]
    ratios = {b: p["latency_ms"] / best["latency_ms"] for b, p in rest}
    return lines, {"backend": fast, "recipe": best["recipe"], "batch": best["batch"], "slower_by": ratios}


def _torch_row(deployed: str) -> str:
    """The Table-2 row a deployed cell's name stands for."""
    if deployed == "fp32":
        return FP32
    if deployed.startswith("recover-"):
        return deployed.removeprefix("recover-") + " + recovery"
    return deployed


def finetune_flags(conf: dict[str, Any]) -> list[str]:
    """`craft-deploy finetune` flags for the fields of a FinetuneConfig dict that differ from their defaults."""
    import dataclasses

    flags: list[str] = []
    for f in dataclasses.fields(FinetuneConfig):
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        value = list(conf[f.name]) if isinstance(conf.get(f.name), tuple) else conf.get(f.name)
        if f.name in ("threads", "init") or f.name not in conf or value == default:
            continue
        value, flag = conf[f.name], "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def commands(res: Results, pick: dict[str, Any], backend: str, specs: dict[str, dict[str, Any]]) -> list[str]:
    """The commands that reproduce a recommended cell from the pretrained model, for its first deployed seed."""
    seed, o, row = pick["seeds"][0], pick["optimizer"], pick["recipe"]
    ft = f"{o}-s{seed}"
    deploy = specs[f"{ft}/deploy/{backend}/{row}"]
    cmds, model = [], "ft"
    first = specs.get(f"{ft}/tunecomp-r{row.removeprefix('tunecomp-r')}") if row.startswith("tunecomp-r") else None
    base = first or specs[f"{ft}/finetune"]
    cmds.append("craft-deploy finetune " + " ".join(finetune_flags(base["config"])) + f" --out {model}")
    recipe = row.removeprefix("recover-")
    if row != "fp32" and first is None:
        c = specs[f"{ft}/compress/{recipe}"]["config"]
        r = parse_recipe(recipe)[0]
        data = [f"--calib-samples {c['calib_samples']}"] + ([f"--eval-subset {c['eval_subset']}"] if c["eval_subset"]
                                                             else [])  # fmt: skip
        cmds.append(f"craft-deploy compress {model} " + " ".join(r.cli_flags() + data) + " --out compressed")
        model = "compressed"
        if row.startswith("recover-"):
            rc = specs[f"{ft}/recover/{recipe}"]["config"]
            cmds.append(
                f"craft-deploy finetune --init {model} "
                + " ".join(finetune_flags({k: v for k, v in rc.items() if k not in ("model", "data", "pretrained")}))
                + " --out recovered"
            )
            model = "recovered"
    ex, be = deploy["config"]["export"], deploy["config"]["bench"]
    sizes = ",".join(str(b) for b in be["batch_sizes"])
    from craft_deploy.study.cells import export_format_for

    fmt = export_format_for(backend)
    if fmt is not None:
        cmds.append(f"craft-deploy export {model} --format {fmt} --target {ex['target']} --batch-sizes {sizes} "
                    "--out exported")  # fmt: skip
        model = "exported"
    subset = f" --eval-subset {be['eval_subset']}" if be["eval_subset"] else ""
    precision = f" --precision {be['precision']}" if be.get("precision", "fp32") != "fp32" else ""
    cmds.append(f"craft-deploy bench {model} --backend {be['backend']}{precision} --batch-sizes {sizes}{subset} "
                "--out bench")  # fmt: skip
    return cmds


def plots(res: Results, root: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # Figure 4 of the paper: top-1 against unstructured sparsity, one line per optimizer, a band of +- 1 std
    families: dict[str, dict[float, str]] = {}
    for row in res.rows:
        if row == FP32 or row.endswith("recovery") or row.startswith("tunecomp"):
            continue
        r = parse_recipe(row)[0]
        kw = r.kwargs
        if r.quant is None and "rank_ratio" not in kw and kw.get("sparsity") and ":" not in kw["sparsity"]:
            fam = kw.get("prune_method", "magnitude") + (" + BN" if kw.get("bn_recalibrate") else "")
            families.setdefault(fam, {})[float(kw["sparsity"])] = row
    if families:
        fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
        for ax, (fam, by_ratio) in zip(axes[0], sorted(families.items())):
            for o in res.optimizers:
                xs, ms, sds = [], [], []
                for ratio, row in sorted({0.0: FP32, **by_ratio}.items()):
                    vals = list(res.top1.get((o, row), {}).values())
                    if vals:
                        m, sd = mean_std(vals)
                        xs.append(ratio), ms.append(m), sds.append(sd)
                line = ax.plot(xs, ms, marker="o", label=o)[0]
                ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                                color=line.get_color(), alpha=0.2)  # fmt: skip
            ax.set(title=f"pruning: {fam}", xlabel="sparsity", ylabel="top-1 % (mean ± std over seeds)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(root / "pruning_curves.png", dpi=100)
        plt.close(fig)
        written.append("pruning_curves.png")
    if res.lambdas:
        fig, ax = plt.subplots(figsize=(5, 4))
        for i, o in enumerate(res.optimizers):
            vals = list(res.lambdas.get(o, {}).values())
            if vals:
                ax.bar(i, statistics.mean(vals), yerr=mean_std(vals)[1], capsize=4)
                ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(res.optimizers)), res.optimizers)
        ax.set(title="sharpness of the fine-tuned model", ylabel="lambda_max (Hessian, BN eval)")
        fig.tight_layout()
        fig.savefig(root / "diagnostics.png", dpi=100)
        plt.close(fig)
        written.append("diagnostics.png")
    for backend in sorted({k[0] for k in res.deployed}):
        fig, ax = plt.subplots(figsize=(7, 5))
        points = []
        for (b, o, row), by_seed in res.deployed.items():
            if b != backend:
                continue
            batch = min(int(k) for k in next(iter(by_seed.values()))["latency_ms"])
            rr = res.latency(backend, row, batch)  # side by side when timed so, else the cell's own run
            for m in by_seed.values():
                points.append((rr if rr is not None else m["latency_ms"][str(batch)], m["top1"], o, row))
        for o in res.optimizers:
            mine = [p for p in points if p[2] == o]
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], label=o, s=18)
        front, best = [], -1.0
        for p in sorted(points):
            if p[1] > best:
                front.append(p)
                best = p[1]
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        for p in front:
            ax.annotate(p[3], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"accuracy vs latency on {backend} (batch {batch})", xlabel="p50 latency, ms", ylabel="top-1 %")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"pareto_{backend}.png"
        fig.savefig(root / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def speed_table(res: Results) -> list[str]:
    """The round-robin timings: p50 per recipe and batch, its ratio to FP32 and the spread over the passes."""
    if not res.speed:
        return [
            "Latencies are p50 of each deployed cell's own bench run, one model at a time (no round-robin "
            f"timing in this study): differences under {LATENCY_NOISE:.0%} are within this machine's drift.",
            "",
        ]
    lines = []
    for backend, m in sorted(res.speed.items()):
        batches = sorted({int(b) for per in m["latency_ms"].values() for b in per})
        lines += [
            f"### Side by side on {backend} ({m['rounds']} round-robin passes, one deployed model per recipe)",
            "",
            "p50 ms, the median of the passes (min-max over the passes), and the speed-up over FP32 measured "
            "in the same run; the cell each model comes from is in study.json.",
            "",
            "| recipe | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        fp32 = m["latency_ms"].get("fp32", {})
        rows = sorted(m["latency_ms"], key=lambda r: m["latency_ms"][r].get(str(batches[0]), float("inf")))
        for row in rows:
            cells = []
            for b in batches:
                p50, runs = m["latency_ms"][row].get(str(b)), m["round_p50_ms"][row].get(str(b), [])
                if p50 is None:
                    cells.append("-")
                    continue
                ratio = f", {fp32[str(b)] / p50:.2f}x" if str(b) in fp32 else ""
                cells.append(f"{p50:.2f} ({min(runs):.2f}-{max(runs):.2f}){ratio}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def write_report(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """Write report.md and the plots into `root`; return what the report concluded (stored in study.json)."""
    from craft_deploy.artifacts import atomic_write_bytes

    cfg = record["config"]
    res = Results(record)
    specs = {c["id"]: c["spec"] for c in record["cells"]}
    failed = [c for c in record["cells"] if c["status"] == "error"]
    verdict_lines, verdict = verdicts(res)
    rec_lines, picks = recommendation(res, cfg["max_drop"], specs)
    across_lines, across = across_backends(picks)
    images = plots(res, root)
    env = record["environment"]
    lines = [
        f"# Study: {cfg['model']} on {cfg['data']}",
        "",
        f"{len(res.optimizers)} fine-tuning optimizers x {len(cfg['seeds'])} seeds "
        f"({', '.join(map(str, cfg['seeds']))}); {len(record['cells'])} cells ({len(failed)} failed, "
        f"{len(record['trimmed'])} trimmed by the budget). Machine: {env.get('cpu')} ({env.get('cpu_count')} cores), "
        f"torch {env.get('libraries', {}).get('torch')}; this run {minutes(record['timings']['this_run_seconds'])}, "
        f"{minutes(record['timings']['cell_seconds'])} of cell time in all. Test images: "
        f"{cfg['eval_subset'] or 'all'} per seed (the same images for every optimizer of a seed, so comparisons are "
        "paired).",
        "",
        "## Top-1 after compression (the CrAFT paper's Table 2 layout)",
        "",
        "Mean ± std over seeds; the drop from the same fine-tuning's FP32 in parentheses. Pruning cells re-estimate "
        "BatchNorm where the recipe says `bn`.",
        "",
        *table2(res),
        "",
        "## Does it help? Paired comparison with the baseline",
        "",
        *verdict_lines,
    ]
    if res.lambdas:
        lines += ["## Diagnostics", "", "| optimizer | lambda_max (mean ± std) | per seed |", "|---|---|---|"]
        for o in res.optimizers:
            vals = res.lambdas.get(o, {})
            if vals:
                m, sd = mean_std(list(vals.values()))
                per = ", ".join(f"s{s}: {v:.1f}" for s, v in sorted(vals.items()))
                lines.append(f"| {o} | {m:.1f} ± {sd:.1f} | {per} |")
        lines.append("")
    lines += [
        f"## Recommendation (accuracy budget: {cfg['max_drop']:g} point(s) from FP32)",
        "",
        *rec_lines,
        *across_lines,
        "",
    ]
    lines += speed_table(res)
    if failed:
        lines += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        lines += [f"| {c['id']} | {c['error'].splitlines()[0][:200]} |" for c in failed]
        lines.append("")
    if record["trimmed"]:
        lines += ["## Trimmed by --budget-minutes", "", ", ".join(t["id"] for t in record["trimmed"]), ""]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in images], ""]
    atomic_write_bytes(root / "report.md", "\n".join(lines).encode())
    return {"verdicts": verdict, "recommendation": picks, "across_backends": across, "plots": images}
