"""`vilex tokenize-dataset` on a real local Ray: the three inputs, the tokens against `vilex tokenize`, reruns.

The reference is `vilex tokenize` itself, run through the CLI on the same images written as files: the tokens of
every row must equal its tokens within TOLERANCE. Both decode with vilex.images and call
ViLexPipeline.tokenize; only the batches differ (the job's --batch-size, tokenize's one batch), and float32
matrix products may round differently with another batch size.

One local Ray serves the module (starting one costs seconds on idle cores), with 3 logical CPUs: two tokenizer
actors and a slot for reading and writing. The checks of flags, inputs and the OUT folder need no Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vilex.cli import main
from vilex.errors import ViLexUsageError

TOLERANCE = 1e-5  # max |difference| between a row's tokens and `vilex tokenize`'s, float32


# ---- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's jobs (the command uses a running Ray and leaves it running), or the
    cluster that RAY_ADDRESS names, as Ray itself reads it (3 CPUs or more)."""
    import ray

    from vilex.scale.tokenize_dataset import start_local_ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        yield ray
        ray.shutdown()
        return
    temp = Path(tempfile.mkdtemp(prefix="vxray-", dir="/tmp"))  # short: Ray's socket paths must stay short
    try:
        start_local_ray(num_cpus=3, object_store_memory=200 * 2**20, _temp_dir=str(temp), include_dashboard=False)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def scene_bytes(count: int, start: int = 0) -> list[bytes]:
    """`count` toy-world scenes (distinct images) as PNG bytes."""
    from vilex.toyworld.scenes import make_scenes, render

    encoded = []
    for scene in make_scenes(count, split_seed=7, start=start):
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (50, 70), (30, 160, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def run(capsys, *argv) -> tuple[int, str, str]:
    """`vilex ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference_tokens(tmp_path: Path, images: dict[str, bytes], *flags) -> dict[str, np.ndarray]:
    """{name: (K, D) tokens} from `vilex tokenize FLAGS IMAGE... --out` on `images` written as files."""
    from vilex.outputs import load_tokens

    folder = tmp_path / f"reference-{len(list(tmp_path.glob('reference-*')))}"
    folder.mkdir()
    paths = []
    for i, data in enumerate(images.values()):
        extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[Image.open(io.BytesIO(data)).format]
        paths.append(folder / f"{i:03d}.{extension}")
        paths[-1].write_bytes(data)
    assert main(["tokenize", *map(str, flags), *map(str, paths), "--out", str(folder / "tokens.safetensors")]) == 0
    tokens = load_tokens(folder / "tokens.safetensors").numpy()  # (B, K, D)
    return dict(zip(images, tokens))


def read_rows(out: Path) -> dict[str, dict]:
    """{source or source#key: row} of the tokenized images, read back with pyarrow from OUT, as a user would."""
    table = pq.read_table(out)
    rows = {}
    for row in table.to_pylist():
        name = f"{row['source']}#{row['key']}" if row["key"] else row["source"]
        assert name not in rows, f"{name} twice in {out}"
        rows[name] = row
    return rows


def read_unreadable(out: Path) -> dict[str, str]:
    """{source or source#key: reason} from OUT/_unreadable.jsonl."""
    from vilex.scale.output import UNREADABLE

    entries = [json.loads(line) for line in (out / UNREADABLE).read_text().splitlines()]
    return {f"{e['source']}#{e['key']}" if e["key"] else e["source"]: e["reason"] for e in entries}


def assert_tokens_equal(rows: dict[str, dict], reference: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, expected in reference.items():
        got = np.asarray(rows[name]["tokens"], dtype=np.float32)
        assert got.shape == expected.shape, name
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= TOLERANCE, f"tokens differ from `vilex tokenize` by {worst:.3g} > {TOLERANCE}"
    return worst


# ---- without Ray: flags, inputs, the OUT folder ---------------------------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["CKPT", "IN", "--batch-size", "0"], "--batch-size must be in"),
    (["CKPT", "IN", "--actors", "0"], "--actors must be in"),
    (["CKPT", "IN", "--tokens", "76"], "--tokens must be in 1..75"),
    (["CKPT", "IN", "--num-cpus", "4", "--address", "auto"], "--num-cpus is for the local Ray"),
    (["A", "B", "C"], "expected [CKPT] INPUT"),
    (["IN"], "CKPT is required"),
    (["CKPT", "IN", "--backend", "triton"], "--backend: invalid choice: 'triton'"),
    (["CKPT", "IN", "--format", "csv"], "--format: invalid choice: 'csv'"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(capsys, tmp_path, argv, named):
    code, out, err = run(capsys, "tokenize-dataset", *argv, "--out", tmp_path / "out")
    assert code == 2
    assert named in err and err.strip().splitlines()[-1].startswith("vilex tokenize-dataset: error:"), err
    assert not (tmp_path / "out").exists()


def test_a_wrong_checkpoint_or_export_fails_before_ray(capsys, tmp_path, tiny_ckpt):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    for argv, named in [(["/nonexistent", tmp_path / "images"], "is not a ViLex checkpoint"),
                        ([tiny_ckpt, tmp_path / "images", "--engines", tmp_path, "--backend", "torch"],
                         "--engines needs --backend onnxruntime or tensorrt"),
                        ([tmp_path / "images", "--engines", tmp_path], "is not an export folder")]:
        code, _, err = run(capsys, "tokenize-dataset", *argv, "--out", tmp_path / "out")
        assert code == 2 and named in err, err
    assert not (tmp_path / "out").exists()


def test_vilex_help_and_the_missing_extra_without_ray(tmp_path):
    """Ray is imported lazily: `vilex --help` works where it is missing, and the command says what to install."""
    script = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
              "from vilex.cli import main\n"
              "code = main(['tokenize-dataset', 'CKPT', 'IN', '--out', 'OUT'])\n"
              "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    sys.exit(100 + code + (exit.code or 0))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 102, result.stderr[-2000:]  # the command: 2; --help: 0
    assert "tokenize-dataset" in result.stdout
    assert "pip install 'vilex[scale]'" in result.stderr


def test_input_is_resolved_to_files_of_one_format(tmp_path):
    from vilex.scale.inputs import expand_pattern, resolve_input

    assert expand_pattern("s/{000008..000010}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar"]
    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "sub" / "a.png")
    (tmp_path / "mixed" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "mixed" / "a.txt").write_text("a caption")
    found = resolve_input(str(tmp_path / "mixed"))
    assert found.format == "images" and [f.source for f in found.files] == ["sub/a.png"]
    tarfile.open(tmp_path / "mixed" / "b.tar", "w").close()  # a tar with no members
    with pytest.raises(ViLexUsageError, match="holds 1 images, 1 webdataset: give --format"):
        resolve_input(str(tmp_path / "mixed"))
    assert [f.source for f in resolve_input(str(tmp_path / "mixed"), "webdataset").files] == ["b.tar"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "c.tar").write_bytes(b"not a tar")
    with pytest.raises(ViLexUsageError, match="INPUT file 'c.tar' is not a readable tar shard: truncated header"):
        resolve_input(str(tmp_path / "junk"))
    with pytest.raises(ViLexUsageError, match="--id-column is for parquet input; .* whose ids are their paths"):
        resolve_input(str(tmp_path / "mixed"), "images", id_column="id")
    with pytest.raises(ViLexUsageError, match=r"2 of the 3 files it names do not exist \(first: .*c1.tar\)"):
        resolve_input(str(tmp_path / "mixed") + "/{b,c1,c2}.tar")
    with pytest.raises(ViLexUsageError, match="no such file, folder or brace pattern"):
        resolve_input(str(tmp_path / "nothing"))
    pq.write_table(pa.table({"picture": pa.array([b"x"]), "n": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ViLexUsageError, match=r"--image-column 'image' is not a column of 't.parquet' \(it has picture"):
        resolve_input(str(tmp_path / "t.parquet"))
    with pytest.raises(ViLexUsageError, match="--image-column 'n' of 't.parquet' is int64: expected encoded image bytes"):
        resolve_input(str(tmp_path / "t.parquet"), image_column="n")


def test_parquet_rows_from_a_plain_binary_column_with_ids_and_done_rows_dropped():
    from vilex.scale.inputs import to_image_rows

    batch = pa.table({"img": pa.array([b"a", None, b"c"], pa.binary()), "id": [10, 11, 12],
                      "path": ["/data/p.parquet"] * 3})
    rows = to_image_rows(batch, format="parquet", sources={"/data/p.parquet": "p.parquet"}, image_column="img",
                         id_column="id", done={("p.parquet", "12")})
    assert rows.to_pylist() == [
        {"source": "p.parquet", "key": "10", "image": b"a", "error": None},
        {"source": "p.parquet", "key": "11", "image": None, "error": "no image bytes (column 'img' is null)"}]


def test_out_keeps_whole_shards_of_an_interrupted_run_and_refuses_other_settings(tmp_path):
    from vilex.scale.output import STAGING, OutputFolder

    settings = {"checkpoint_sha256": "abc", "backend": "torch", "precision": "fp32", "num_tokens": 4, "token_dim": 2,
                "input_root": "/data", "input_format": "images", "image_column": None, "id_column": None}
    folder = OutputFolder.open(tmp_path / "out", settings)
    # What a run that died leaves in .staging/: one shard Ray finished, one cut short mid-write.
    staging = tmp_path / "out" / STAGING
    staging.mkdir()
    whole = pa.table({"source": ["a.png"], "key": [""], "tokens": pa.array([[[0.0, 1.0]] * 4]), "num_tokens": [4],
                      "checkpoint_sha256": ["abc"]})
    pq.write_table(whole, staging / "x_000000-0.parquet")
    pq.write_table(whole, staging / "x_000001-0.parquet")
    data = (staging / "x_000001-0.parquet").read_bytes()
    (staging / "x_000001-0.parquet").write_bytes(data[: len(data) // 2])
    assert folder.recover() == (1, 1)
    assert not staging.exists() and [p.name for p in folder.shards()] == ["x_000000-0.parquet"]
    assert folder.done() == {("a.png", "")}
    summary = folder.commit({}, {}, {("b.png", ""): "IMAGE 'b.png': not a readable image"})
    assert summary.rows == 1 and summary.unreadable == [("b.png", "IMAGE 'b.png': not a readable image")]
    assert folder.done() == {("a.png", ""), ("b.png", "")}  # an unreadable image is not tried again
    with pytest.raises(ViLexUsageError, match=r"another tokenize-dataset run \(pid \d+\)"):
        OutputFolder.open(tmp_path / "out", settings)
    folder.close()
    with pytest.raises(ViLexUsageError, match=r"other settings: num_tokens 4 \(this run: 8\)"):
        OutputFolder.open(tmp_path / "out", {**settings, "num_tokens": 8})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ViLexUsageError, match="not empty and was not made by tokenize-dataset"):
        OutputFolder.open(tmp_path / "other", settings)


def test_a_stopped_job_is_said_in_one_line():
    """What Ray raises when a reader or an actor's constructor fails -> the line naming the cause."""
    from vilex.scale.tokenize_dataset import root_cause

    class RayTaskError(Exception):  # Ray's wrappers carry the original as `cause`
        def __init__(self, message, cause=None):
            super().__init__(message)
            self.cause = cause

    read = tarfile.ReadError("unexpected end of data\nTo change retry attempts, configure DataContext")
    assert root_cause(RayTaskError("ray::ReadWebDataset() failed", read)) == "ReadError: unexpected end of data"
    died = RayTaskError("The actor died because of an error raised in its creation task\nTraceback ...\n"
                        "vilex.errors.CheckpointError: CKPT 'x' is not a ViLex checkpoint", RayTaskError(""))
    assert root_cause(died) == "vilex.errors.CheckpointError: CKPT 'x' is not a ViLex checkpoint"


# ---- on Ray ------------------------------------------------------------------------------------------------
def test_an_image_folder_equals_vilex_tokenize_and_a_rerun_skips_what_is_done(local_ray, tiny_ckpt, sample_files,
                                                                              tmp_path, capsys):
    from vilex.engines.folder import checkpoint_sha256
    from vilex.scale.output import SUCCESS

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    images = {f"sub/{p.name}": p.read_bytes() for p in sample_files}  # 96x96
    images.update({f"scene-{i}.png": b for i, b in enumerate(scene_bytes(3))})  # 64x64
    for name, encoded in images.items():
        (data / name).write_bytes(encoded)
    (data / "sub" / "broken.png").write_bytes(b"not an image")
    (data / "scene-0.txt").write_text("a caption: not an image, ignored")
    out = tmp_path / "out"

    code, stdout, _ = run(capsys, "tokenize-dataset", tiny_ckpt, data, "--out", out, "--actors", 2, "--batch-size", 2,
                          "--progress-every", 0.5)
    assert code == 0
    rows = read_rows(out)
    assert set(rows) == set(images)
    assert_tokens_equal(rows, reference_tokens(tmp_path, images, tiny_ckpt))
    digest = checkpoint_sha256(tiny_ckpt, cache=False)
    assert {r["checkpoint_sha256"] for r in rows.values()} == {digest}
    assert {r["num_tokens"] for r in rows.values()} == {75}
    unreadable = read_unreadable(out)
    assert list(unreadable) == ["sub/broken.png"] and "bytes are not a readable image" in unreadable["sub/broken.png"]
    assert "(1 unreadable)" in stdout and "sub/broken.png" in stdout
    assert "tokenizing with 2 actors" in stdout and "images/s overall" in stdout
    # Each actor that registered has a line, and they account for every image. Not "both actors worked": on a
    # busy host the first actor can take every batch before the second has loaded the model (seen in CI).
    per_actor = [int(n) for n in re.findall(r"^  actor \d+ \(.+\): (\d+) images in", stdout, re.MULTILINE)]
    assert 1 <= len(per_actor) <= 2 and sum(per_actor) == 8
    success = json.loads((out / SUCCESS).read_text())
    assert sorted(success["shards"]) == sorted(p.name for p in out.glob("*.parquet"))
    assert success["tokenized"] == 7 and success["unreadable"] == 1 and not (out / ".staging").exists()

    # A rerun reads nothing; two new images are the only ones tokenized next.
    code, stdout, _ = run(capsys, "tokenize-dataset", tiny_ckpt, data, "--out", out)
    assert code == 0 and "0 to read, 8 images already" in stdout and "nothing new to tokenize" in stdout
    assert read_rows(out).keys() == rows.keys()
    added = {f"sub/new-{i}.png": b for i, b in enumerate(scene_bytes(2, start=50))}
    for name, encoded in added.items():
        (data / name).write_bytes(encoded)
    code, stdout, _ = run(capsys, "tokenize-dataset", tiny_ckpt, data, "--out", out, "--actors", 1)
    assert code == 0 and "2 to read" in stdout and "tokenized 2 images (0 unreadable)" in stdout
    rows = read_rows(out)
    assert set(rows) == set(images) | set(added)
    assert_tokens_equal(rows, reference_tokens(tmp_path, added, tiny_ckpt))


def test_hugging_face_parquet_on_onnxruntime_equals_vilex_tokenize(local_ray, tiny_engines, tmp_path, capsys):
    """The layout `datasets` writes: an `image` struct {bytes, path}; a row without bytes is reported, not fatal."""
    encoded = scene_bytes(5, start=10) + [jpeg_bytes()]
    (tmp_path / "data").mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, part, paths in [("train-0.parquet", encoded[:4], ["a.png", "b.png", "c.png", "d.png"]),
                              ("train-1.parquet", encoded[4:] + [None], ["e.png", "f.jpg", "on-disk.png"])]:
        pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": p} for b, p in zip(part, paths)], image_type),
                                 "label": list(range(len(paths)))}), tmp_path / "data" / name)
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "tokenize-dataset", tmp_path / "data", "--engines", tiny_engines, "--out", out,
                          "--tokens", 8, "--batch-size", 4, "--actors", 1)
    assert code == 0
    rows = read_rows(out)
    names = {f"train-{0 if i < 4 else 1}.parquet#sha256:{hashlib.sha256(b).hexdigest()}": b
             for i, b in enumerate(encoded)}
    assert set(rows) == set(names)
    assert_tokens_equal(rows, reference_tokens(tmp_path, names, "--backend", "onnxruntime", "--engines", tiny_engines,
                                               "--tokens", 8))
    # The row without bytes (an image on the writer's disk) has no content id: its key is empty.
    assert read_unreadable(out) == {"train-1.parquet": "no image bytes (column 'image' is null)"}
    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    assert {r["checkpoint_sha256"] for r in rows.values()} == {manifest["source"]["sha256"]}

    # A finished parquet file is not even read again.
    code, stdout, _ = run(capsys, "tokenize-dataset", tmp_path / "data", "--engines", tiny_engines, "--out", out,
                          "--tokens", 8)
    assert code == 0 and "0 to read" in stdout


def test_webdataset_shards_from_a_brace_pattern_equal_vilex_tokenize(local_ray, tiny_ckpt, tmp_path, capsys):
    scenes = scene_bytes(3, start=20)
    webp = io.BytesIO()
    Image.open(io.BytesIO(scenes[2])).save(webp, format="WEBP", lossless=True)
    samples = [[("s0", "png", scenes[0]), ("s0", "txt", b"a caption"), ("s1", "jpg", jpeg_bytes()),
                ("s2", "txt", b"a caption without an image")],
               [("s3", "png", scenes[1]), ("s4", "png", b"\x89PNG but cut"), ("s5", "webp", webp.getvalue())]]
    (tmp_path / "shards").mkdir()
    for index, members in enumerate(samples):
        with tarfile.open(tmp_path / "shards" / f"{index:06d}.tar", "w") as tar:
            for key, extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "tokenize-dataset", tiny_ckpt, str(tmp_path / "shards") + "/{000000..000001}.tar",
                          "--out", out, "--tokens", 4, "--batch-size", 3, "--actors", 1)
    assert code == 0
    rows = read_rows(out)
    images = {"000000.tar#s0": scenes[0], "000000.tar#s1": jpeg_bytes(), "000001.tar#s3": scenes[1],
              "000001.tar#s5": webp.getvalue()}
    assert_tokens_equal(rows, reference_tokens(tmp_path, images, tiny_ckpt, "--tokens", 4))
    assert set(rows) == set(images)
    unreadable = read_unreadable(out)
    assert set(unreadable) == {"000000.tar#s2", "000001.tar#s4"}
    assert unreadable["000000.tar#s2"].startswith("no member with an image extension")
    assert "not a readable image" in unreadable["000001.tar#s4"]
    assert "(2 unreadable)" in stdout
