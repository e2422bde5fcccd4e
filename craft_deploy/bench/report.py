"""bench.json -> report.md and PNG plots (latency vs batch size, accuracy vs latency across models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_markdown(record: dict[str, Any], path: Path) -> None:
    """A table per model and backend: accuracy, then latency per batch size."""
    env = record["environment"]
    lines = [
        f"# Benchmark ({record['created']})",
        "",
        f"CPU: {env['cpu']} ({env['cpu_count']} cores); GPU: {env.get('gpu', 'none')}; "
        f"torch {env['libraries']['torch']}, onnxruntime {env['libraries']['onnxruntime']}",
        "",
    ]
    for (model, backend), rows in _groups(record["results"]).items():
        first = rows[0]
        lines += [
            f"## {model} on {backend}",
            "",
            (
                f"top-1 {first['top1']:.2f}%, top-5 {first['top5']:.2f}% on {first['samples']} "
                f"{first['dataset']} {first['split']} images"
                if first["top1"] is not None
                else "accuracy not measured by this backend (timings only)"
            )
            + (f"; model file {first['model_size_bytes'] / 1e6:.2f} MB" if first["model_size_bytes"] else ""),
            "",
            "| batch | p50 ms | p90 ms | p99 ms | mean ms | cv | images/s | re-measured |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['batch']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['mean_ms']:.2f} | {r['cv']:.3f} | {r['images_per_second']:.1f} | {r.get('remeasured', 0)} |"
            )
        lines.append("")
    if (record.get("gate") or {}).get("mode") == "paired":
        lines += ["## Paired regression gate", "", "```", record["gate"]["table"], "```"]
    elif record.get("gate"):
        gate = record["gate"]
        lines += [
            "## Regression gate",
            "",
            f"baseline: {gate['baseline']}; verdict: {'passed' if gate['passed'] else 'FAILED'}",
            "",
            "| row | p50 base | p50 now | change | top-1 base | top-1 now | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in gate["rows"]:
            lines.append(
                f"| {r['row']} | {r['baseline_p50_ms']:.2f} | {r['p50_ms']:.2f} | "
                f"{100 * r['latency_change']:+.1f}% | {_pct(r['baseline_top1'])} | {_pct(r['top1'])} | "
                f"{'; '.join(r['reasons']) or 'ok'} |"
            )
    path.write_text("\n".join(lines) + "\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _groups(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["backend"]), []).append(r)
    return groups


def write_plots(results: list[dict[str, Any]], out: Path) -> list[str]:
    """latency_vs_batch.png always; accuracy_vs_latency.png (Pareto front marked) when several models were run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (model, backend), rows in groups.items():
        ax.plot(
            [r["batch"] for r in rows],
            [r["p50_ms"] / r["batch"] for r in rows],
            marker="o",
            label=f"{model} ({backend})",
        )
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in results})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    written.append(
        _finish(fig, ax, "p50 latency per image (ms)", "latency vs batch size", out / "latency_vs_batch.png")
    )
    if len(groups) > 1 and all(r["top1"] is not None for r in results):
        batch = min(r["batch"] for r in results)
        points = [(r["p50_ms"], r["top1"], f"{r['model']} ({r['backend']})") for r in results if r["batch"] == batch]
        front = [p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for lat, acc, label in points:
            ax.scatter(lat, acc, s=40, zorder=3, marker="*" if (lat, acc, label) in front else "o")
            ax.annotate(label, (lat, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", label="Pareto front")
        ax.margins(x=0.35, y=0.15)
        ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
        written.append(_finish(fig, ax, "top-1 (%)", "accuracy vs latency", out / "accuracy_vs_latency.png"))
    return written


def _finish(fig, ax, ylabel: str, title: str, path: Path) -> str:
    """Label, grid, legend and save a figure; returns the file name."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
