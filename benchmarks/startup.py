"""Start-up time and peak memory of a runtime that runs an export's graphs, before and after the
engine-only runtime (issue 11):

    python -m vilex.benchmarks.startup CKPT ENGINES [--repeat 3]

Each case runs in a fresh Python process (imports included) and reports wall time from process start to
a pipeline ready to run, and the process's peak RSS (ru_maxrss); then the same once every graph's onnxruntime
session is open (sessions open on first use, so that is where a first request, or a warm-up, would be):

    weights+hash   what `--backend onnxruntime --engines E CKPT` did before: load CKPT's PyTorch weights,
                   hash CKPT's files, open onnxruntime sessions on the graphs
    engines-only   `open_pipeline(None, "onnxruntime", engines=E)`: host files and sessions, no weights
    engines+ckpt   `open_pipeline(CKPT, "onnxruntime", engines=E)`, with CKPT's hash already cached
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASES = {
    "weights+hash": """
from vilex.runtime import load_pipeline
from vilex.engines.folder import EngineFolder, checkpoint_sha256
from vilex.backends.onnxruntime import OnnxRuntimeBackend
pipeline = load_pipeline(CKPT)
folder = EngineFolder.open(ENGINES)
assert checkpoint_sha256(CKPT, cache=False) == folder.manifest["source"]["sha256"]
pipeline.set_backend(OnnxRuntimeBackend(folder))
""",
    "engines-only": """
from vilex.runtime import open_pipeline
pipeline = open_pipeline(None, "onnxruntime", engines=ENGINES)
""",
    "engines+ckpt": """
from vilex.runtime import open_pipeline
pipeline = open_pipeline(CKPT, "onnxruntime", engines=ENGINES)
""",
}

EPILOGUE = """
import json, resource, time
ready = {"seconds": time.time() - START, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
# onnxruntime sessions open on first use: then every graph's, as a first request (or a warm-up) would.
for graph in pipeline.backend.contracts:
    pipeline.backend.session(graph)
ready["sessions_seconds"] = time.time() - START
ready["sessions_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(ready))
"""


def run_case(name: str, ckpt: str, engines: str, cache: str) -> dict:
    import time

    code = f"CKPT, ENGINES = {ckpt!r}, {engines!r}\n" + CASES[name] + EPILOGUE
    env = dict(os.environ, VILEX_CACHE=cache)
    start = time.time()
    code = f"START = {start!r}\n" + code
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("engines")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        # Fill the hash cache once, as the export (or a first run) does.
        run_case("engines+ckpt", args.ckpt, args.engines, cache)
        rows = []
        for name in CASES:
            runs = [run_case(name, args.ckpt, args.engines, cache) for _ in range(args.repeat)]
            rows.append({"case": name, **{f"{key}_median": statistics.median(r[key] for r in runs) for key in runs[0]},
                         "runs": runs})
    print("| case | start-up s (median of %d) | peak RSS MB | with every graph's session open: s | peak RSS MB |"
          % args.repeat)
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['seconds_median']:.2f} | {row['peak_rss_mb_median']:.0f} | "
              f"{row['sessions_seconds_median']:.2f} | {row['sessions_peak_rss_mb_median']:.0f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
