"""The OUT folder of `vilex tokenize-dataset`: what it holds, how a run commits to it, what a rerun skips.

    OUT/_vilex_tokens.json  what every shard holds: the checkpoint's hash, backend and precision, the token count
                            and width, INPUT's folder, format and columns; a run with other settings is refused
    OUT/*.parquet           the shards: one row per tokenized image, the columns of SCHEMA_COLUMNS below
    OUT/_unreadable.jsonl   every image that could not be tokenized: {"source", "key", "reason"}, one a line
    OUT/_SUCCESS            JSON, written last: the shards of the finished output, its counts, the input files
                            a run finished (parquet and tar) and the last run's figures
    OUT/.staging/           where the running job's write_parquet writes
    OUT/.lock               held (flock) while a run works on OUT: two runs never write one OUT

Never half-written: Ray Data writes the shards into `.staging/`; only when the whole job has succeeded are they
renamed into OUT (a rename on one filesystem: each file appears whole), then `_unreadable.jsonl` and `_SUCCESS`
are replaced (each written to a temporary name, then renamed), so the shards `_SUCCESS` lists are always a
complete output. A run that dies leaves its finished shards in `.staging/`; the next run keeps those whose
parquet footer reads (parquet writes its footer last, so a file cut short has none) and deletes the rest,
before anything else.

A rerun skips what is done, per image: the (source, key) pairs of OUT's shards and of `_unreadable.jsonl` are
read first (two string columns per shard) and those images are not tried again (delete `_unreadable.jsonl` to
retry the unreadable ones). Image folders are filtered by listing, so done images are not even read; parquet
files and tar shards that a finished run recorded in `_SUCCESS` with the same size and modification time are
not read either; other files are read and their done rows dropped before decoding. Rows are never removed:
an image that changed under the same id keeps its old tokens (use a new OUT).

Unreadable images have no row in the shards: pyarrow (25) cannot read back a null fixed-size list from parquet
("Expected all lists to be of size=K but index i had size=0"), and a row of zeros would pass for tokens.
Every other file's name starts with `.` or `_`, which pyarrow's and Ray Data's parquet readers skip, so
`pyarrow.parquet.read_table(OUT)` and `ray.data.read_parquet(OUT)` read the shards alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vilex.engines.folder import write_json_atomic
from vilex.errors import ViLexUsageError

FORMAT = "vilex-tokens"
FORMAT_VERSION = 1
SETTINGS = "_vilex_tokens.json"
SUCCESS = "_SUCCESS"
UNREADABLE = "_unreadable.jsonl"
STAGING = ".staging"
LOCK = ".lock"
# One row per tokenized image: where it came from, its tokens (K fixed-size lists of D float32), K, and the
# checkpoint's content hash.
SCHEMA_COLUMNS = ("source", "key", "tokens", "num_tokens", "checkpoint_sha256")
# The settings a rerun must share with the run that made OUT: tokens made otherwise do not belong together.
CHECKED_SETTINGS = ("checkpoint_sha256", "backend", "precision", "num_tokens", "token_dim", "input_root",
                    "input_format", "image_column", "id_column")


def row_id(source: str, key: str) -> str:
    """How reports name an image: its file, and its key inside a parquet file or tar shard."""
    return f"{source}#{key}" if key else source


@dataclass
class Summary:
    """What OUT holds after a commit."""

    shards: list[str]
    rows: int  # tokenized images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (row id, reason), sorted


class OutputFolder:
    def __init__(self, root: Path, settings: dict, lock_file):
        self.root = root
        self.settings = settings
        self._lock_file = lock_file

    # ---- opening: settings and the lock -------------------------------------------------------------------
    @classmethod
    def open(cls, out: str | os.PathLike, settings: dict) -> "OutputFolder":
        """OUT, created if new; refused when it is something else, another run holds it, or it was made with
        other settings (named)."""
        root = Path(out).absolute()  # Ray's write tasks run in another working folder
        if root.exists() and not root.is_dir():
            raise ViLexUsageError(f"--out '{root}' exists and is not a folder")
        if root.is_dir() and any(root.iterdir()) and not (root / SETTINGS).is_file():
            raise ViLexUsageError(f"--out '{root}' is not empty and was not made by tokenize-dataset (no {SETTINGS}); "
                                  f"choose a new folder")
        root.mkdir(parents=True, exist_ok=True)
        lock_file = open(root / LOCK, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "?"
            lock_file.close()
            raise ViLexUsageError(f"--out '{root}' is being written by another tokenize-dataset run (pid {holder}); "
                                  f"wait for it or choose another folder") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        folder = cls(root, settings, lock_file)
        try:
            folder._check_settings()
        except BaseException:
            folder.close()
            raise
        return folder

    def _check_settings(self) -> None:
        path = self.root / SETTINGS
        if not path.is_file():
            write_json_atomic(path, {"format": FORMAT, "format_version": FORMAT_VERSION, **self.settings})
            return
        try:
            recorded = json.loads(path.read_text())
        except ValueError as error:
            raise ViLexUsageError(f"--out '{self.root}': {SETTINGS} is not valid JSON ({error}); "
                                  f"choose a new folder") from None
        if recorded.get("format") != FORMAT or recorded.get("format_version") != FORMAT_VERSION:
            raise ViLexUsageError(f"--out '{self.root}': {SETTINGS} is not a {FORMAT} v{FORMAT_VERSION} file")
        differ = [f"{key} {recorded.get(key)!r} (this run: {self.settings.get(key)!r})" for key in CHECKED_SETTINGS
                  if recorded.get(key) != self.settings.get(key)]
        if differ:
            raise ViLexUsageError(f"--out '{self.root}' holds tokens made with other settings: {'; '.join(differ)}. "
                                  f"Use another --out for these settings")

    def close(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ---- what is there ------------------------------------------------------------------------------------
    @property
    def staging(self) -> Path:
        return self.root / STAGING

    def shards(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))

    def recover(self) -> tuple[int, int]:
        """Keep the whole shards an interrupted run left in .staging/, delete the rest: (kept, deleted)."""
        if not self.staging.is_dir():
            return 0, 0
        kept = deleted = 0
        for path in sorted(self.staging.rglob("*")):
            if path.is_file() and path.suffix == ".parquet" and _is_whole_shard(path):
                os.replace(path, self.root / path.name)
                kept += 1
            elif path.is_file():
                deleted += 1
        shutil.rmtree(self.staging)
        return kept, deleted

    def done(self) -> set[tuple[str, str]]:
        """The (source, key) of every image OUT holds tokens for or lists as unreadable."""
        import pyarrow.parquet as pq

        done = set(self.unreadable())
        for shard in self.shards():
            table = pq.read_table(shard, columns=["source", "key"])
            done.update(zip(table["source"].to_pylist(), table["key"].to_pylist()))
        return done

    def unreadable(self) -> dict[tuple[str, str], str]:
        """{(source, key): reason} from `_unreadable.jsonl` (empty when there is none)."""
        path = self.root / UNREADABLE
        if not path.is_file():
            return {}
        entries = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            entries[(entry["source"], entry["key"])] = entry["reason"]
        return entries

    def finished_inputs(self) -> dict[str, list[int]]:
        """{source: [size, mtime_ns]} of the parquet files and tar shards that finished runs read whole."""
        return dict(self._success().get("inputs", {}))

    def _success(self) -> dict:
        try:
            return json.loads((self.root / SUCCESS).read_text())
        except (OSError, ValueError):
            return {}

    # ---- committing ---------------------------------------------------------------------------------------
    def start_staging(self) -> Path:
        self.staging.mkdir()
        return self.staging

    def commit(self, inputs: dict[str, list[int]], run: dict | None,
               unreadable: dict[tuple[str, str], str] | None = None) -> Summary:
        """Move the finished job's shards into OUT, then add its `unreadable` images to `_unreadable.jsonl` and
        write `_SUCCESS` (last) with the job's figures (`run`; None: a run that tokenized nothing keeps the last
        figures)."""
        import pyarrow.parquet as pq

        if self.staging.is_dir():
            for path in sorted(self.staging.rglob("*.parquet")):
                os.replace(path, self.root / path.name)
            shutil.rmtree(self.staging)
        entries = {**self.unreadable(), **(unreadable or {})}
        _write_text_atomic(self.root / UNREADABLE, "".join(
            json.dumps({"source": source, "key": key, "reason": reason}) + "\n"
            for (source, key), reason in sorted(entries.items())))
        shards = self.shards()
        summary = Summary([p.name for p in shards], sum(pq.read_metadata(p).num_rows for p in shards),
                          sorted((row_id(*image), reason) for image, reason in entries.items()))
        write_json_atomic(self.root / SUCCESS, {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shards": summary.shards, "tokenized": summary.rows, "unreadable": len(entries),
            "inputs": {**self.finished_inputs(), **inputs},
            "last_run": run if run is not None else self._success().get("last_run")})
        return summary


def _is_whole_shard(path: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return False
    return all(column in names for column in SCHEMA_COLUMNS)


def _write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.partial")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
