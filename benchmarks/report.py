"""Benchmark output: results.json (with the environment), results.md (tables), PNG plots, ratios."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import isolation


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
    unsound = sorted({why for reasons in row_problems(report).values() for why in reasons})
    if unsound:
        lines += ["", "Unsound figures (do not compare them): " + "; ".join(unsound)]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


# ---- soundness of a figure ----------------------------------------------------------------------------------
# A ratio is only as good as the two rows it divides. A row is unsound when its measurement windows never
# agreed (measure.py's `stable: false`), or when a call at a smaller batch took longer than a call at a larger
# batch of the same stage and backend by more than the stability margin: a call with more work taking markedly
# less time means one of the two figures caught a transient (a clock change, a lazy initialization, another
# process), so neither stands for the backend. Both rows of such a pair are marked. A row is also unsound when
# something else of the run was alive beside it (another backend, a server: benchmarks/isolation.py).
def row_key(row: dict) -> tuple:
    return (row_label(row), row["backend"], row["batch"], row["stats"]["concurrency"])


def row_problems(report: dict) -> dict[tuple, list[str]]:
    """{row_key: why its figure is unsound} for every row with a problem."""
    margin = float(report.get("settings", {}).get("stability", 0.10))
    problems: dict[tuple, list[str]] = defaultdict(list)
    series = defaultdict(list)  # (label, backend, concurrency) -> rows over batch sizes
    for row in report["results"]:
        where = f"{row_label(row)} {row['backend']} batch {row['batch']} conc {row['stats']['concurrency']}"
        if not row["stats"]["stable"]:
            problems[row_key(row)].append(f"{where}: unstable (windows did not agree)")
        for why in isolation.problems(row["stats"].get("extra", {}).get("alongside", {})):
            problems[row_key(row)].append(f"{where}: {why}")
        series[(row_label(row), row["backend"], row["stats"]["concurrency"])].append(row)
    for rows in series.values():
        rows = sorted(rows, key=lambda r: r["batch"])
        for i, small in enumerate(rows):
            for large in rows[i + 1:]:
                a, b = small["stats"]["p50_ms"], large["stats"]["p50_ms"]
                if large["batch"] > small["batch"] and a > b * (1 + margin):
                    why = (f"{row_label(small)} {small['backend']} batch {small['batch']} p50 {a:.1f} ms is above "
                           f"batch {large['batch']}'s {b:.1f} ms")
                    for row in (small, large):
                        problems[row_key(row)].append(why)
    return dict(problems)


def comparisons(report: dict, baseline: str = "torch") -> list[dict]:
    """p50 latency ratios backend/baseline per stage and batch, and Triton vs in-process end to end, each with
    `stable` (both rows sound) and the `problems` that make it unsound."""
    problems = row_problems(report)
    by_key = defaultdict(dict)
    for row in report["results"]:
        by_key[(row_label(row), row["batch"], row["stats"]["concurrency"])][row["backend"]] = row

    def compare(what, batch, conc, row, base, served=False) -> dict:
        why = problems.get(row_key(base), []) + problems.get(row_key(row), [])
        ratio = row["stats"]["p50_ms"] / base["stats"]["p50_ms"]
        return {"what": what, "batch": batch, "concurrency": conc, "backend": row["backend"],
                "baseline": base["backend"], "served_vs_in_process": served, "latency_ratio": ratio,
                "speedup": 1 / ratio, "stable": not why, "problems": list(dict.fromkeys(why))}

    found = []
    for (what, batch, conc), rows in by_key.items():
        if baseline in rows:
            found += [compare(what, batch, conc, row, rows[baseline]) for backend, row in rows.items()
                      if backend != baseline]
    # Served vs in-process end to end (the serving target): triton-* against onnxruntime.
    for (what, batch, conc), rows in by_key.items():
        if what.startswith("end-to-end") and "onnxruntime" in rows:
            found += [compare(what, batch, conc, row, rows["onnxruntime"], served=True) for backend, row in rows.items()
                      if backend.startswith("triton")]
    return found


UNSOUND_NOTE = ("(unstable): a row behind this ratio did not settle (stable: no) or is slower at a smaller batch than "
                "at a larger one; the ratio is not a sound speed-up. Rerun with a longer --window.")


def ratios(report: dict, baseline: str = "torch") -> list[str]:
    """`comparisons` as printed lines; unsound ones are marked '(unstable)' with their reasons and a footnote."""
    lines = []
    for c in comparisons(report, baseline):
        head = f"{c['what']:<40} batch {c['batch']} conc {c['concurrency']}: {c['backend']}/{c['baseline']}"
        if c["served_vs_in_process"]:
            text = f"{head} (in-process) = {c['latency_ratio']:.2f}x latency"
        else:
            text = f"{head} = {c['latency_ratio']:.2f}x latency ({c['speedup']:.2f}x speed-up)"
        if not c["stable"]:
            text += " (unstable) [" + "; ".join(c["problems"]) + "]"
        lines.append(text)
    if any("(unstable)" in line for line in lines):
        lines.append(UNSOUND_NOTE)
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
