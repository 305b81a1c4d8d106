"""Benchmark output: results.json (with the environment), results.md (tables), PNG plots, ratios."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def row_label(row: dict) -> str:
    if row["kind"] == "stage":
        return row["stage"]
    return f"end-to-end ({row['steps']} steps, {row['num_tokens']} tokens)"


def markdown(report: dict) -> str:
    env = report["environment"]
    gpu = env["gpu"]["name"] if env["gpu"] else "no GPU"
    lines = [
        f"Measured {report['date']} on {env['cpu']['model']} ({env['cpu']['cores']} cores), {gpu}; "
        f"checkpoint `{report['checkpoint']}`.",
        f"Command: `{report['command']}`",
        "",
        "| what | backend | batch | conc. | p50 ms | p90 ms | p99 ms | mean ms | img/s | GFLOP/call | % of peak | peak RSS MB | peak GPU MB | stable |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["results"]:
        s = row["stats"]
        flops = row.get("flops")
        lines.append(
            f"| {row_label(row)} | {row['backend']} | {row['batch']} | {s['concurrency']} | {s['p50_ms']:.1f} | "
            f"{s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['mean_ms']:.1f} | {s['throughput']:.2f} | "
            f"{flops / 1e9 if flops else float('nan'):.1f} | "
            f"{100 * row['fraction_of_peak'] if row.get('fraction_of_peak') is not None else float('nan'):.1f} | "
            f"{s['peak_rss_mb']:.0f} | {s['peak_gpu_mb'] or float('nan'):.0f} | {'yes' if s['stable'] else 'no'} |")
    lines += ["", "Peaks assumed: " + "; ".join(f"{k}: {v}" for k, v in report["peaks"].items())]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def ratios(report: dict, baseline: str = "torch") -> list[str]:
    """p50 latency ratios backend/baseline per stage and batch, and Triton vs in-process end to end."""
    by_key = defaultdict(dict)
    for row in report["results"]:
        key = (row_label(row), row["batch"], row["stats"]["concurrency"])
        by_key[key][row["backend"]] = row["stats"]["p50_ms"]
    lines = []
    for (label, batch, conc), values in by_key.items():
        if baseline not in values:
            continue
        for backend, p50 in values.items():
            if backend != baseline:
                lines.append(f"{label:<40} batch {batch} conc {conc}: {backend}/{baseline} = "
                             f"{p50 / values[baseline]:.2f}x latency ({values[baseline] / p50:.2f}x speed-up)")
    # Served vs in-process end to end (the serving target): triton-* against onnxruntime at concurrency 1.
    for (label, batch, conc), values in by_key.items():
        if label.startswith("end-to-end") and "onnxruntime" in values:
            for backend, p50 in values.items():
                if backend.startswith("triton"):
                    lines.append(f"{label:<40} batch {batch} conc {conc}: {backend}/onnxruntime (in-process) = "
                                 f"{p50 / values['onnxruntime']:.2f}x latency")
    return lines


def plots(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stage_rows = [r for r in report["results"] if r["kind"] == "stage"]
    if stage_rows:
        stages = sorted({r["stage"] for r in stage_rows})
        fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.5), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            for backend in sorted({r["backend"] for r in stage_rows}):
                points = sorted((r["batch"], r["stats"]["p50_ms"]) for r in stage_rows
                                if r["stage"] == stage and r["backend"] == backend)
                if points:
                    ax.plot(*zip(*points), marker="o", label=backend)
            ax.set_title(stage)
            ax.set_xlabel("batch (images)")
            ax.set_ylabel("p50 latency (ms)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / "latency_vs_batch.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    served = [r for r in report["results"] if r["backend"].startswith("triton")]
    if served:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for backend in sorted({r["backend"] for r in served}):
            points = sorted((r["stats"]["concurrency"], r["stats"]["throughput"]) for r in served if r["backend"] == backend)
            ax.plot(*zip(*points), marker="o", label=backend)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("images/s")
        ax.set_title("Triton end to end")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "triton_throughput_vs_concurrency.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    for path in plots(report, out):
        files[path.stem] = path
    return files
