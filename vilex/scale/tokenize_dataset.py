"""`vilex tokenize-dataset`: a dataset's images -> ViLex tokens in parquet shards, on Ray Data.

    Ray Data readers (tasks)      rows (source, key, image bytes)                          inputs.py
    map_batches(Tokenizer)        one actor per device: decode with vilex.images, tokenize with
                                  ViLexPipeline.tokenize on the chosen backend, the calls `vilex tokenize` makes
    write_parquet                 into OUT/.staging, moved into OUT when the job has succeeded      output.py

Ray Data schedules, streams and retries; nothing here queues or schedules work of its own. The driver only
resolves the input, checks the flags, commits the output and prints progress from a small counter actor
that the tokenizer actors report to after each batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError, check_range

from .inputs import DatasetInput, InputFile, read_rows
from .output import UNREADABLE, OutputFolder, Summary, row_id

BACKENDS = ("torch", "onnxruntime", "tensorrt")
SHARD_BYTES = 128 * 2**20  # a shard holds about this much token data (rows = SHARD_BYTES / (K * D * 4))
READ_CPUS = 1.0  # each read or write task; the actors get the rest
AGENT_START_TIMEOUT_MS = 180_000  # see start_local_ray


class JobFailed(ViLexUsageError):
    """The Ray Data job stopped: in practice a file of INPUT that its reader cannot read (a tar cut short)."""


@dataclass
class JobOptions:
    ckpt: str | None = None
    engines: str | None = None
    backend: str = "torch"
    num_tokens: int | None = None  # K: keep the first K tokens (default: all N)
    batch_size: int = 32
    actors: int | None = None  # default: one per GPU, or one on a CPU-only cluster
    cpus_per_actor: int | None = None  # default: 1 on GPU hosts, else the CPUs left after reading, shared
    address: str | None = None  # a Ray cluster; None: a local Ray
    num_cpus: int | None = None  # the local Ray's logical CPUs (default: cores + 1, or --actors x --cpus-per-actor + 1)
    progress_every: float = 10.0  # seconds between progress lines


# ---- the model: checked on the driver, loaded in the actors --------------------------------------------------
@dataclass
class ModelSource:
    checkpoint_sha256: str
    precision: str
    num_queries: int  # N
    token_dim: int  # D
    max_batch: int | None  # a TensorRT export's bound on images per call


def identify_model(options: JobOptions) -> ModelSource:
    """What the actors will load, checked here first so that a wrong flag fails before Ray starts."""
    from vilex.engines.folder import CHECKPOINT_HASH, EngineFolder, checkpoint_sha256

    if options.backend not in BACKENDS:
        extra = " (a server holds its own model; tokenize-dataset runs the encoder in its actors)" \
            if options.backend == "triton" else ""
        raise ViLexUsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}{extra}")
    if options.backend == "torch":
        if options.engines is not None:
            raise ViLexUsageError("--engines needs --backend onnxruntime or tensorrt (--backend torch runs CKPT's weights)")
        if options.ckpt is None:
            raise ViLexUsageError("--backend torch needs CKPT (a checkpoint folder)")
        from vilex.pipeline import check_checkpoint

        ckpt = check_checkpoint(options.ckpt)
        config = json.loads((ckpt / "vilex" / "config.json").read_text())
        return ModelSource(checkpoint_sha256(ckpt), "fp32", int(config["num_queries"]), int(config["output_dim"]), None)
    if options.engines is None:
        raise ViLexUsageError(f"--backend {options.backend} needs --engines engines/NAME "
                              f"(make one with `vilex export {options.ckpt or 'CKPT'} --out engines/NAME`)")
    folder = EngineFolder.open(options.engines)
    source = folder.manifest["source"]
    if options.ckpt is not None:
        folder.check_source(options.ckpt)
        digest = checkpoint_sha256(options.ckpt)
    elif source.get("hash") == CHECKPOINT_HASH:
        digest = source["sha256"]
    else:
        raise ViLexUsageError(f"--engines '{options.engines}' was exported before checkpoints were hashed by content; "
                              f"give CKPT as well, so that the rows carry its content hash")
    max_batch = folder.options.max_batch if options.backend == "tensorrt" else None
    return ModelSource(digest, folder.precision, folder.dims.num_queries, folder.dims.hidden_size, max_batch)


class Tokenizer:
    """One Ray Data actor per device: the ViLex encoder on the chosen backend, loaded once.

    Each batch of rows (source, key, image bytes, error) becomes rows (source, key, tokens, num_tokens,
    checkpoint_sha256) for the images that decode; the others are reported to the progress actor with their
    reason, never a failed batch. The decoder and the tokenize call are `vilex tokenize`'s own (vilex.images,
    ViLexPipeline.tokenize), so the tokens are the same.
    """

    def __init__(self, ckpt, engines, backend: str, num_tokens: int, token_dim: int, threads: int,
                 checkpoint_sha256: str, progress):
        import ray
        import torch

        from vilex.runtime import open_pipeline

        torch.set_num_threads(threads)
        pipeline = open_pipeline(ckpt, backend, engines=engines)
        if backend == "torch" and torch.cuda.is_available():  # Ray gave this actor a GPU (num_gpus=1)
            pipeline.to("cuda")
        if backend == "onnxruntime" and not pipeline.backend.on_gpu:
            pipeline.set_backend(_cpu_onnxruntime_backend(pipeline.backend, threads))
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.checkpoint_sha256 = checkpoint_sha256
        self.progress = progress
        self.actor = ray.get(progress.register.remote(f"{socket.gethostname()}:{os.getpid()}"))

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import ray

        from vilex.errors import ImageInputError
        from vilex.images import decode_image

        start = time.perf_counter()
        sources, keys = batch["source"].to_pylist(), batch["key"].to_pylist()
        errors = batch["error"].to_pylist()
        images, positions = [], []
        for i, data in enumerate(batch["image"].to_pylist()):
            if errors[i] is not None:
                continue
            try:
                images.append(decode_image(data, name=f"IMAGE '{row_id(sources[i], keys[i])}'"))
                positions.append(i)
            except ImageInputError as error:
                errors[i] = str(error)
        K, D = self.num_tokens, self.token_dim
        tokens = np.zeros((0, K, D), np.float32)
        if images:
            tokens = self.pipeline.tokenize(images, num_tokens=K).cpu().numpy()  # (b, K, D) float32
        rows = pa.table({
            "source": pa.array([sources[i] for i in positions], pa.string()),
            "key": pa.array([keys[i] for i in positions], pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(
                pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), D), K),  # K lists of D floats
            "num_tokens": pa.array([K] * len(positions), pa.int32()),
            "checkpoint_sha256": pa.array([self.checkpoint_sha256] * len(positions), pa.string())})
        unreadable = [(sources[i], keys[i], e) for i, e in enumerate(errors) if e is not None]
        # Waited for: the driver reads the unreadable list once the job is done, so none may be in flight then.
        ray.get(self.progress.report.remote(self.actor, len(positions), unreadable, time.perf_counter() - start))
        return rows


def _cpu_onnxruntime_backend(backend, threads: int):
    """The same export on onnxruntime's CPU provider with `threads` threads that do not spin while idle
    (several actors share the host's cores; sessions are made on first use, so none exists yet)."""
    import onnxruntime as ort

    from vilex.backends.onnxruntime import OnnxRuntimeBackend

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return OnnxRuntimeBackend(backend.engines, providers=backend.providers, variant=backend.variant,
                              session_options=options)


class Progress:
    """A counter actor: the tokenizer actors report each batch (and its unreadable images), the driver reads
    counts while the job runs and the unreadable images at the end."""

    def __init__(self):
        self.names: list[str] = []
        self.tokenized: list[int] = []
        self.failed: list[int] = []
        self.busy: list[float] = []
        self.first_batch: float | None = None  # time.time() when the first batch was reported
        self.first_batch_images = 0
        self.unreadable: dict[tuple[str, str], str] = {}  # a batch Ray Data retries is reported twice: once here

    def register(self, name: str) -> int:
        self.names.append(name)
        self.tokenized.append(0)
        self.failed.append(0)
        self.busy.append(0.0)
        return len(self.names) - 1

    def report(self, actor: int, tokenized: int, unreadable: list[tuple[str, str, str]], seconds: float) -> None:
        if self.first_batch is None:
            self.first_batch, self.first_batch_images = time.time(), tokenized + len(unreadable)
        self.tokenized[actor] += tokenized
        self.failed[actor] += len(unreadable)
        self.busy[actor] += seconds
        self.unreadable.update({(source, key): reason for source, key, reason in unreadable})

    def snapshot(self) -> dict:
        return {"names": self.names, "tokenized": self.tokenized, "unreadable": self.failed, "busy": self.busy,
                "first_batch": self.first_batch, "first_batch_images": self.first_batch_images}

    def unreadable_images(self) -> dict[tuple[str, str], str]:
        return self.unreadable


# ---- Ray ----------------------------------------------------------------------------------------------------
def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the `data` extra's packages (pyarrow, pandas) come with it
    except ImportError as error:
        raise ViLexUsageError(f"tokenize-dataset needs Ray Data, which is not installed ({error}): "
                              f"pip install 'vilex[scale]'") from None
    return ray


@contextlib.contextmanager
def ray_session(options: JobOptions, log):
    """The caller's Ray when one is running (a test, a notebook: theirs to stop), else the cluster at `--address`
    (or RAY_ADDRESS, as Ray reads it), else a local Ray with `--num-cpus` logical CPUs; disconnected or stopped at
    the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = options.address or os.environ.get("RAY_ADDRESS")  # what `ray job submit` sets for its driver
    if address:
        ray.init(address=address)
        log(f"connected to the Ray cluster at {address}")
    else:
        # One logical CPU more than the cores (or than the actors asked for, when more): the read and write tasks
        # (I/O mostly) get a slot of their own beside the actors, which share the cores.
        wanted = (options.actors or 1) * (options.cpus_per_actor or 1)
        num_cpus = options.num_cpus or max(os.cpu_count() or 1, wanted) + 1
        start_local_ray(num_cpus=num_cpus, include_dashboard=False)
        log(f"started a local Ray with {num_cpus} CPUs")
    try:
        yield ray
    finally:
        ray.shutdown()


def start_local_ray(**init_kwargs):
    """ray.init(**init_kwargs) for a local Ray, with a start-up wait for its agents that a busy host can meet.

    Works around Ray 2.60's start-up on a busy host: the raylet waits about 15 s for its dashboard agent (a
    Python process, started even without the dashboard) to write its port files, then aborts, and ray.init
    fails with "The current node timed out during startup". Seen here on 2 cores shared with a training job:
    5 starts of 5 failed; with RAY_agent_register_timeout_ms raised, every start since has succeeded, each in
    under 10 s. A value the user set is kept."""
    import ray

    os.environ.setdefault("RAY_agent_register_timeout_ms", str(AGENT_START_TIMEOUT_MS))
    return ray.init(**init_kwargs)


@dataclass
class Placement:
    actors: int
    cpus_per_actor: int
    gpus_per_actor: int


def place_actors(ray, options: JobOptions) -> Placement:
    """One actor per GPU (num_gpus=1 each) where the cluster has GPUs, else --actors on CPUs; each error names
    the flag and what the cluster has."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if options.backend == "tensorrt" and not gpus:
        raise ViLexUsageError("--backend tensorrt needs GPUs in the Ray cluster; it has none")
    actors = options.actors or max(gpus, 1)
    if gpus and actors > gpus:
        raise ViLexUsageError(f"--actors {actors}: the Ray cluster has {gpus} GPUs, one actor each (at most {gpus})")
    cpus_per_actor = options.cpus_per_actor or (1 if gpus else max(1, int((cpus - READ_CPUS) // actors)))
    if actors * cpus_per_actor + READ_CPUS > cpus:
        raise ViLexUsageError(f"--actors {actors} x --cpus-per-actor {cpus_per_actor} leaves the Ray cluster's {cpus} "
                              f"CPUs none for reading and writing; lower one (at most {max(cpus - 1, 0)} in all)"
                              + ("" if options.address or os.environ.get("RAY_ADDRESS") else ", or raise --num-cpus"))
    return Placement(actors, cpus_per_actor, 1 if gpus else 0)


# ---- the job ------------------------------------------------------------------------------------------------
def tokenize_dataset(dataset_input: DatasetInput, out: str, options: JobOptions, log=print) -> Summary:
    """Tokenize every image of `dataset_input` that OUT does not hold yet, and commit them to OUT."""
    # 1. The model and the flags that depend on it, before anything is started.
    model = identify_model(options)
    num_tokens = model.num_queries if options.num_tokens is None else options.num_tokens
    check_range("--tokens", num_tokens, 1, model.num_queries)
    check_range("--batch-size", options.batch_size, 1)
    if model.max_batch and options.batch_size > model.max_batch:
        raise ViLexUsageError(f"--batch-size {options.batch_size} is above the TensorRT export's max batch "
                              f"{model.max_batch} (its engines take no more; `vilex export --max-batch` sets it)")
    settings = {"checkpoint_sha256": model.checkpoint_sha256, "backend": options.backend,
                "precision": model.precision, "num_tokens": num_tokens, "token_dim": model.token_dim,
                "input_root": str(dataset_input.root), "input_format": dataset_input.format,
                "image_column": dataset_input.image_column, "id_column": dataset_input.id_column}
    import_ray()
    # 2. OUT: its lock, what an interrupted run left, and what is done already.
    folder = OutputFolder.open(out, settings)
    try:
        kept, deleted = folder.recover()
        if kept or deleted:
            log(f"kept {kept} whole shards of an interrupted run, deleted {deleted} partial files")
        done = folder.done()
        files, expected = files_to_read(dataset_input, done, folder.finished_inputs())
        log(f"{dataset_input.describe()}: {len(files)} to read, {len(done)} images already in {out}")
        if not files:
            summary = folder.commit({}, None)  # lists the shards an interrupted run left, if it kept any
            log(f"nothing new to tokenize; {out} holds {summary.rows} tokenized images "
                f"({len(summary.unreadable)} unreadable listed in {Path(out) / UNREADABLE})")
            return summary
        # 3. The Ray Data pipeline: read -> tokenize (actors) -> write into OUT/.staging.
        with ray_session(options, log) as ray:
            placement = place_actors(ray, options)
            progress = ray.remote(num_cpus=0)(Progress).remote()
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars, bars = False, context.enable_progress_bars  # ours says it per actor
            reading = {f.source for f in files}
            rows = read_rows(dataset_input, files, {d for d in done if d[0] in reading}, READ_CPUS,
                             options.batch_size)
            tokens = rows.map_batches(
                Tokenizer, batch_format="pyarrow", batch_size=options.batch_size,
                compute=ray.data.ActorPoolStrategy(size=placement.actors),
                num_cpus=placement.cpus_per_actor, num_gpus=placement.gpus_per_actor,
                fn_constructor_kwargs=dict(ckpt=_absolute(options.ckpt), engines=_absolute(options.engines),
                                           backend=options.backend,
                                           num_tokens=num_tokens, token_dim=model.token_dim,
                                           threads=placement.cpus_per_actor,
                                           checkpoint_sha256=model.checkpoint_sha256, progress=progress))
            log(f"tokenizing with {placement.actors} actor{'s' * (placement.actors > 1)} on {options.backend} "
                f"({placement.cpus_per_actor} CPU{'s' * (placement.cpus_per_actor > 1)}"
                f"{', 1 GPU' if placement.gpus_per_actor else ''} each), batches of {options.batch_size}")
            rows_per_shard = max(1, SHARD_BYTES // (num_tokens * model.token_dim * 4))
            started = time.time()
            try:
                with _reporting(progress, started, expected, options.progress_every, log):
                    tokens.write_parquet(str(folder.start_staging()), min_rows_per_file=rows_per_shard,
                                         ray_remote_args={"num_cpus": READ_CPUS})
            except Exception as error:  # noqa: BLE001 - Ray has logged the whole trace; say what stopped, in one line
                raise JobFailed(f"the Ray Data job stopped ({root_cause(error)}); OUT keeps what it had, and the "
                                f"shards finished before the error in {folder.staging} for the next run") from error
            finally:
                context.enable_progress_bars = bars
            finished = time.time()
            figures = run_figures(ray.get(progress.snapshot.remote()), started, finished)
            unreadable = ray.get(progress.unreadable_images.remote())
        # 4. Commit: the shards move into OUT, then the unreadable list and _SUCCESS.
        inputs = {f.source: [f.size, f.mtime_ns] for f in files} if dataset_input.format != "images" else {}
        summary = folder.commit(inputs, figures, unreadable)
    finally:
        folder.close()
    for line in describe_run(figures, summary, out):
        log(line)
    return summary


def root_cause(error: BaseException) -> str:
    """What stopped a Ray job, on one line: the last `SomeError: message` line of the innermost exception under
    Ray's wrappers (a RayTaskError's `cause`, then `__cause__`) that has one, such as the error an actor's
    constructor raised (Ray puts that one's traceback into ActorDiedError's text), else its first line."""
    chain: list[BaseException] = []
    while isinstance(error, BaseException) and all(error is not seen for seen in chain):
        chain.append(error)
        error = getattr(error, "cause", None) or error.__cause__
    for exception in reversed(chain):
        lines = [line.strip() for line in str(exception).splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b[^:]*: ", line)]
        if raised:
            return raised[-1]
        if lines:  # Ray appends its retry advice on later lines
            return f"{type(exception).__name__}: {lines[0]}"
    return type(chain[-1]).__name__


def _absolute(path: str | None) -> str | None:
    """A path as the actors must get it: they run in Ray's working folder (and on other nodes), not ours."""
    return None if path is None else str(Path(path).absolute())


def files_to_read(dataset_input: DatasetInput, done: set[tuple[str, str]],
                  finished: dict[str, list[int]]) -> tuple[list[InputFile], int | None]:
    """(the files a run must read, how many images it should tokenize, None where that is unknown)."""
    if dataset_input.format == "images":
        files = [f for f in dataset_input.files if (f.source, "") not in done]
        return files, len(files)
    files = [f for f in dataset_input.files if finished.get(f.source) != [f.size, f.mtime_ns]]
    if dataset_input.format == "parquet":
        import pyarrow.parquet as pq

        reading = {f.source for f in files}
        total = sum(pq.read_metadata(f.path).num_rows for f in files)
        return files, max(0, total - sum(1 for source, _ in done if source in reading))
    return files, None  # a tar shard's sample count is known only by reading it


@contextlib.contextmanager
def _reporting(progress, started: float, expected: int | None, every: float, log):
    """Print progress every `every` seconds while the job runs."""
    import ray

    stop = threading.Event()

    def report():
        while not stop.wait(every):
            try:
                snapshot = ray.get(progress.snapshot.remote(), timeout=every)
            except Exception:  # noqa: BLE001 - a slow answer skips one line, it does not stop the job
                continue
            log(progress_line(snapshot, started, time.time(), expected))

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def progress_line(snapshot: dict, started: float, now: float, expected: int | None) -> str:
    images = sum(snapshot["tokenized"]) + sum(snapshot["unreadable"])
    of = f" / {expected}" if expected else ""
    actors = ", ".join(f"actor {i} {_rate(n + u, busy)}" for i, (n, u, busy) in
                       enumerate(zip(snapshot["tokenized"], snapshot["unreadable"], snapshot["busy"])))
    return (f"[{now - started:6.1f} s] {images}{of} images, {_rate(images, now - started)} overall"
            + (f"; {actors}" if actors else "; actors starting"))


def _rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.1f} images/s" if seconds > 0 else "- images/s"


def run_figures(snapshot: dict, started: float, finished: float) -> dict:
    """The run's throughput: overall (wall time from the job's start, actor start-up included), after the first
    batch (the images after it over the time after it: start-up excluded), and per actor (over the time it spent
    in its batches)."""
    images = sum(snapshot["tokenized"]) + sum(snapshot["unreadable"])
    first = snapshot["first_batch"]
    after = images - snapshot["first_batch_images"]
    return {
        "tokenized": sum(snapshot["tokenized"]), "unreadable": sum(snapshot["unreadable"]),
        "seconds": round(finished - started, 3),
        "images_per_s": round(images / (finished - started), 3) if finished > started else None,
        "first_batch_after_s": round(first - started, 3) if first else None,
        "images_per_s_after_first_batch": round(after / (finished - first), 3) if first and after and finished > first
        else None,
        "actors": [{"actor": name, "images": n + u, "busy_s": round(busy, 3),
                    "images_per_s": round((n + u) / busy, 3) if busy else None}
                   for name, n, u, busy in zip(snapshot["names"], snapshot["tokenized"], snapshot["unreadable"],
                                               snapshot["busy"])],
    }


def describe_run(figures: dict, summary: Summary, out: str, listed: int = 20) -> list[str]:
    lines = [f"tokenized {figures['tokenized']} images ({figures['unreadable']} unreadable) in {figures['seconds']:.1f} s: "
             f"{figures['images_per_s'] or 0:.2f} images/s overall; first batch after "
             f"{figures['first_batch_after_s'] or 0:.1f} s, "
             f"{figures['images_per_s_after_first_batch'] or 0:.2f} images/s after it"]
    for i, actor in enumerate(figures["actors"]):
        lines.append(f"  actor {i} ({actor['actor']}): {actor['images']} images in {actor['busy_s']:.1f} s busy, "
                     f"{actor['images_per_s'] or 0:.2f} images/s")
    lines.append(f"wrote {out}: {len(summary.shards)} shards, {summary.rows} tokenized images; "
                 f"{len(summary.unreadable)} unreadable")
    if summary.unreadable:
        lines.append(f"unreadable: {len(summary.unreadable)} (all listed in {Path(out) / UNREADABLE})")
        lines += [f"  {name}\t{reason}" for name, reason in summary.unreadable[:listed]]
        if len(summary.unreadable) > listed:
            lines.append(f"  ... and {len(summary.unreadable) - listed} more")
    return lines
