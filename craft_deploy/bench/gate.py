"""The regression gate: compare a bench record with a baseline row by row and decide pass or fail."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_deploy import EXIT_REGRESSION, CraftError  # noqa: F401  (EXIT_REGRESSION re-exported)
from craft_deploy.artifacts import read_json

BENCH_SCHEMA = "craft-deploy/bench/v1"
# What must agree between a baseline's model and this run's before their numbers are compared.
IDENTITY = ("architecture", "num_classes", "input_size", "dataset")


@dataclass
class Verdict:
    """Rows compared, rows that could not be matched, and whether any threshold was exceeded."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    only_in_run: list[str] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r["failed"] for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": not self.failed,
            "rows": self.rows,
            "only_in_run": self.only_in_run,
            "only_in_baseline": self.only_in_baseline,
        }


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Load a previous bench.json, refusing other schemas with a message that says what was found."""
    record = read_json(path, "baseline", f"; create one with --baseline {path} --update-baseline")
    schema = record.get("bench_schema") if isinstance(record, dict) else None
    if schema != BENCH_SCHEMA:
        raise CraftError(
            f"baseline {path} has bench schema {schema!r}; this craft-deploy compares {BENCH_SCHEMA!r} "
            "records (re-create it with --update-baseline)"
        )
    return record


def _key(row: dict[str, Any]) -> str:
    return f"{row['model']} / {row['backend']} / batch {row['batch']}"


def compare(
    run: dict[str, Any], baseline: dict[str, Any], max_latency_regression: float, max_accuracy_drop: float
) -> Verdict:
    """Judge every (model, backend, batch) row present in both records.

    Latency fails when p50 grew by more than `max_latency_regression` (a fraction); accuracy fails when top-1 fell by
    more than `max_accuracy_drop` points. A model whose identity differs from the baseline's is an error, not a
    regression.
    """
    for name, model in run["models"].items():
        base = baseline.get("models", {}).get(name)
        if base is None:
            continue
        diff = {k: (base.get(k), model.get(k)) for k in IDENTITY if base.get(k) != model.get(k)}
        if diff:
            raise CraftError(
                f"baseline model {name!r} is another model: {diff} (baseline, this run); "
                "compare like with like or re-create the baseline with --update-baseline"
            )
    base_rows = {_key(r): r for r in baseline.get("results", [])}
    run_rows = {_key(r): r for r in run["results"]}
    verdict = Verdict(
        only_in_run=sorted(set(run_rows) - set(base_rows)), only_in_baseline=sorted(set(base_rows) - set(run_rows))
    )
    if not set(run_rows) & set(base_rows):
        raise CraftError(
            f"no row of this run matches the baseline: it has {sorted(base_rows)[:4]}, this run "
            f"{sorted(run_rows)[:4]}; rows match on (model, backend, batch)"
        )
    for key in [k for k in run_rows if k in base_rows]:  # in the order they were measured
        cur, base = run_rows[key], base_rows[key]
        latency_change = cur["p50_ms"] / base["p50_ms"] - 1.0
        # rows without an accuracy (trtexec timings) are gated on latency alone
        measured = base.get("top1") is not None and cur.get("top1") is not None
        accuracy_drop = base["top1"] - cur["top1"] if measured else 0.0
        reasons = []
        if latency_change > max_latency_regression:
            reasons.append(f"p50 +{100 * latency_change:.1f}% > {100 * max_latency_regression:.1f}%")
        if accuracy_drop > max_accuracy_drop:
            reasons.append(f"top-1 -{accuracy_drop:.2f} pt > {max_accuracy_drop:.2f} pt")
        verdict.rows.append(
            {
                "row": key,
                "baseline_p50_ms": base["p50_ms"],
                "p50_ms": cur["p50_ms"],
                "latency_change": latency_change,
                "baseline_top1": base["top1"],
                "top1": cur["top1"],
                "accuracy_drop": accuracy_drop,
                "cv": cur["cv"],
                "remeasured": cur.get("remeasured", 0),
                "confirmations": cur.get("confirmations", 0),
                "failed": bool(reasons),
                "reasons": reasons,
            }
        )
    return verdict


def format_verdict(verdict: Verdict) -> str:
    """A table of deltas, then the unmatched rows and the verdict."""
    lines = [
        f"{'row':<46} {'p50 base':>9} {'p50 now':>9} {'change':>8} {'top1 base':>9} {'top1 now':>9} {'cv':>6}  verdict"
    ]
    for r in verdict.rows:
        note = "FAIL: " + "; ".join(r["reasons"]) if r["failed"] else "ok"
        if r["remeasured"]:
            note += f" (noisy, re-measured {r['remeasured']}x)"
        if r["confirmations"]:
            note += f" (latency re-checked {r['confirmations']}x, fastest kept)"
        lines.append(
            f"{r['row']:<46} {r['baseline_p50_ms']:>9.2f} {r['p50_ms']:>9.2f} "
            f"{100 * r['latency_change']:>+7.1f}% {_top1(r['baseline_top1']):>9} {_top1(r['top1']):>9} "
            f"{r['cv']:>6.3f}  {note}"
        )
    for key in verdict.only_in_run:
        lines.append(f"{key:<46} not in the baseline: not judged")
    for key in verdict.only_in_baseline:
        lines.append(f"{key:<46} in the baseline but not measured in this run")
    lines.append("gate: FAILED" if verdict.failed else "gate: passed")
    return "\n".join(lines)


def _top1(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def gate_record(cfg, verdict) -> dict[str, Any]:
    """What bench.json records of a gate: the baseline, the thresholds, the verdict and its table."""
    return {
        "baseline": cfg.baseline,
        "thresholds": {
            "max_latency_regression": cfg.max_latency_regression,
            "max_accuracy_drop": cfg.max_accuracy_drop,
        },
        **verdict.to_dict(),
        "table": format_verdict(verdict),
    }
