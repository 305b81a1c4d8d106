"""Training on shards (issue 21, part 2): WebDataset tar shards and parquet files streamed by `vilex train`.

Checked against what tarfile and pyarrow read from the same files, not against the stream's own code:
- a pattern yields exactly the shards' samples (keys, images, captions); broken samples and shards are records
  with a reason, never dropped;
- in every epoch the readers (processes x workers) share out the samples with none twice and none missing,
  for shard counts that do not divide evenly too;
- a stream resumed at its saved positions continues exactly where the uninterrupted one went;
- for real: `torchrun` starts 2 processes (gloo, CPU) of `vilex train` with 2 data loader workers each on 5
  uneven tar shards; the keys each rank trained on (--log-samples) are disjoint in epoch 0 and together are
  every key tarfile lists; both ranks ran every step; the unreadable sample is in report.json. Then
  `--resume` from the step-4 checkpoint, 2 processes again, ends bit-identical to the uninterrupted run;
- parquet in the Hugging Face datasets layout (an `image` struct of bytes and path, a `text` column) trains and
  resumes exactly in one process with 2 workers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vilex.cli import main
from vilex.errors import ViLexUsageError
from vilex.toyworld.scenes import SPLITS, caption_of, make_scenes, render
from vilex.training import checkpoint as ckpt
from vilex.training.data import ShardStream, collate, find_images, shuffle_buffer
from vilex.training.metrics import read_metrics
from vilex.training.shards import ShardSource, expand_pattern

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("braceexpand")

SHARD_SIZES = (4, 4, 4, 4, 3)  # 19 samples in 5 shards: 4 readers (2 processes x 2 workers) cannot split them evenly
BROKEN_IMAGE = "scene-0005"  # its .png member holds bytes that are not an image
NO_IMAGE = "scene-0012"  # has only a .txt member
FAST = ["--batch-size", "2", "--warmup-steps", "1", "--resolution", "32", "--holdout", "0", "--preview-every", "0",
        "--log-every", "1", "--shuffle-buffer", "3", "--log-samples", "--no-progress"]
FINAL_WEIGHTS = Path("pipeline") / "vilex" / "diffusion_pytorch_model.safetensors"


# ---- shards made from the toy world's scenes ---------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process; the in-process runs here each make their own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def toy_samples(count: int) -> list[tuple[str, bytes, str]]:
    """(key, PNG bytes, caption) of toy-world training scenes."""
    return [(f"scene-{i:04d}", png(render(scene)), caption_of(scene))
            for i, scene in enumerate(make_scenes(count, SPLITS["train"]))]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(folder: Path, sizes=SHARD_SIZES) -> list[Path]:
    """WebDataset shards 000000.tar ...: KEY.png + KEY.txt per sample, one broken image, one sample without one."""
    folder.mkdir(parents=True, exist_ok=True)
    samples, paths = iter(toy_samples(sum(sizes))), []
    for index, size in enumerate(sizes):
        path = folder / f"{index:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                key, image, caption = next(samples)
                if key != NO_IMAGE:
                    add_member(tar, f"{key}.png", b"not a png at all" if key == BROKEN_IMAGE else image)
                add_member(tar, f"{key}.txt", caption.encode())
        paths.append(path)
    return paths


def tar_contents(paths) -> dict[str, dict[str, bytes]]:
    """Read independently: {"<shard>:<key>": {extension: bytes}}, grouping members by the name before the first dot."""
    found = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                found.setdefault(f"{path}:{key}", {})[extension] = tar.extractfile(member).read()
    return found


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image()'s arrow type


def write_parquet(path: Path, count: int, rows_per_group: int, folder_image: Path | None = None) -> Path:
    """Hugging Face datasets layout: `image` {bytes, path} and `text`. Row 3 has a null image; with folder_image,
    row 1 refers to that file by path instead of holding bytes (as datasets writes images it did not embed)."""
    images, texts = [], []
    for row, (key, data, caption) in enumerate(toy_samples(count)):
        images.append(None if row == 3 else {"bytes": data, "path": f"{key}.png"})
        texts.append(caption)
    if folder_image is not None:
        images[1] = {"bytes": None, "path": folder_image.name}
    table = pa.table({"image": pa.array(images, type=HF_IMAGE), "text": texts})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


class StackProcessor:
    """A stand-in for the vision encoder's image processor where only the split is under test."""

    def __call__(self, images, return_tensors):
        arrays = [torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) for image in images]  # (3, H, W)
        return {"pixel_values": torch.stack(arrays)}


# ---- reading ------------------------------------------------------------------------------------------------
def test_tar_pattern_yields_the_shards_samples(tmp_path):
    paths = write_tar_shards(tmp_path / "shards")
    source = ShardSource(str(tmp_path / "shards" / "{000000..000004}.tar"))
    assert source.paths == [str(p) for p in paths] and source.describe() == "5 shards"
    assert expand_pattern(str(tmp_path / "shards" / "*.tar")) == source.paths  # a glob names the same files
    read = [raw for piece in source.pieces for raw in source.read_piece(piece)]
    expected = tar_contents(paths)
    assert [raw.key for raw in read] == list(expected)  # every sample, in tar order
    for raw in read:
        members = expected[raw.key]
        assert raw.caption == members["txt"].decode()
        if raw.key.endswith(NO_IMAGE):
            assert raw.image is None and "no image member" in raw.error and ".txt" in raw.error
        else:
            assert raw.image == members["png"] and raw.error is None  # the broken one fails when decoded

    # A shard cut off in the middle: the samples before the cut, then one record saying where it broke.
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2 + 100])
    broken = list(source.read_piece(source.pieces[1]))
    assert [r.key for r in broken[:-1]] == [k for k in expected if k.startswith(str(paths[1]))][: len(broken) - 1]
    assert broken[-1].key == str(paths[1]) and "tar shard unreadable after" in broken[-1].error
    tarfile.open(paths[2], "w").close()  # a valid tar with no members
    assert [r.error for r in source.read_piece(source.pieces[2])] == [f"{paths[2]}: tar shard holds no samples"]
    paths[3].write_bytes(b"")
    assert "tar shard unreadable after 0 samples" in next(source.read_piece(source.pieces[3])).error


def test_parquet_in_the_hugging_face_layout(tmp_path):
    image_file = tmp_path / "by-path.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image_file)
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", count=10, rows_per_group=4, folder_image=image_file)
    source = ShardSource(str(path))
    assert source.describe() == "3 row groups in 1 parquet files"  # 4 + 4 + 2 rows, from the footer
    assert (source.image_column, source.caption_column) == ("image", "text")
    table = pq.read_table(path)
    read = [raw for piece in source.pieces for raw in source.read_piece(piece)]
    assert [raw.key for raw in read] == [f"{path}:{row}" for row in range(10)]
    for row, raw in enumerate(read):
        assert raw.caption == table["text"][row].as_py()
        cell = table["image"][row].as_py()
        if row == 3:
            assert raw.image is None and "column 'image' is null" in raw.error
        elif row == 1:
            assert raw.image == image_file.read_bytes()  # bytes null: read from the path, next to the parquet file
        else:
            assert raw.image == cell["bytes"]
    assert ShardSource(str(path), caption_column="text").caption_column == "text"

    with pytest.raises(ViLexUsageError, match=r"--image-column: .* has no column 'img'; its columns are image, text"):
        ShardSource(str(path), image_column="img")
    with pytest.raises(ViLexUsageError, match=r"--image-column 'text' of .* is string; it must hold encoded image"):
        ShardSource(str(path), image_column="text")
    with pytest.raises(ViLexUsageError, match=r"--caption-column: .* has no column 'alt'"):
        ShardSource(str(path), caption_column="alt")


def test_bad_data_patterns_are_usage_errors(tmp_path):
    write_tar_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{000000..000009}.tar")
    with pytest.raises(ViLexUsageError, match=r"5 of 10 names match no file \(first: .*000005.tar'\)"):
        ShardSource(pattern)
    write_parquet(tmp_path / "shards" / "x.parquet", count=2, rows_per_group=2)
    with pytest.raises(ViLexUsageError, match=r"must name .tar \(WebDataset\) or .parquet files, all of one kind"):
        ShardSource(str(tmp_path / "shards" / "*"))
    with pytest.raises(ViLexUsageError, match=r"--image-column names a parquet column; .* is WebDataset tar shards"):
        ShardSource(str(tmp_path / "shards" / "*.tar"), image_column="image")
    with pytest.raises(ViLexUsageError, match=r"holds no images: .*give a pattern: --data '.*shards/\*.parquet'"):
        find_images(tmp_path / "shards")


# ---- the split, the shuffle, the position ------------------------------------------------------------------------
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 1), (2, 2), (3, 1), (2, 3)])
def test_every_epoch_deals_each_sample_to_exactly_one_reader(tmp_path, world_size, num_workers):
    """5 uneven shards; 1 to 6 readers. In each epoch every sample goes to one reader; readers' shares differ by
    at most one shard, and which readers get the extra one moves on (6 readers: one has none in each epoch)."""
    paths = write_tar_shards(tmp_path / "shards")
    source = ShardSource(str(tmp_path / "shards" / "*.tar"))
    every_key = sorted(tar_contents(paths))
    readers = world_size * max(1, num_workers)
    orders, shards_read = [], np.zeros(readers, dtype=int)
    for epoch in range(4):
        dealt = []
        for rank in range(world_size):
            stream = ShardStream(source, StackProcessor(), 32, seed=5, rank=rank, world_size=world_size,
                                 num_workers=num_workers, buffer_size=3)
            for reader in range(max(1, num_workers)):
                dealt.append((stream.reader_id(reader), [raw.key for raw in stream.raw_epoch(epoch, reader)]))
        keys = [k for _, reader_keys in dealt for k in reader_keys]
        assert sorted(keys) == every_key  # all of them, none twice
        for reader, reader_keys in dealt:
            shards_read[reader] += len({key.split(":")[0] for key in reader_keys})
        # after each epoch, readers are within one shard of each other: none runs ahead
        assert shards_read.max() - shards_read.min() <= 1 and shards_read.sum() == 5 * (epoch + 1)
        orders.append(keys)
    assert orders[0] != orders[1]  # each epoch has its own shard order and shuffle
    again = ShardStream(source, StackProcessor(), 32, seed=5, world_size=1, buffer_size=3)
    if world_size == 1:
        assert [raw.key for raw in again.raw_epoch(0, 0)] == orders[0]  # seeded: the same order every run


def test_shuffle_buffer_is_bounded_and_seeded():
    items = list(range(50))
    out = list(shuffle_buffer(items, 8, np.random.default_rng(1)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 8, np.random.default_rng(1)))
    # An item leaves the buffer only after it was read: the k-th output is one of the first k + 8 inputs.
    assert all(item < k + 8 for k, item in enumerate(out))
    assert list(shuffle_buffer(items, 1, np.random.default_rng(1))) == items


def test_a_stream_resumed_at_its_positions_continues_exactly(tiny_pipeline, tmp_path):
    """2 DataLoader workers; stop after 5 batches, restart from the positions those batches carried."""
    write_tar_shards(tmp_path / "shards")
    source = ShardSource(str(tmp_path / "shards" / "*.tar"))

    def batches(count, positions=None, consumed=0):
        stream = ShardStream(source, tiny_pipeline.image_processor, 32, seed=2, random_crop=True, random_flip=True,
                             num_workers=2, buffer_size=3)
        stream.resume_at(positions or {}, consumed)
        loader = iter(DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate))
        return [next(loader) for _ in range(count)]

    uninterrupted = batches(14)  # 19 samples: past the end of epoch 0 into epoch 1
    assert {epoch for batch in uninterrupted for _, epoch in batch["seen"]} == {0, 1}
    positions = {}
    for batch in uninterrupted[:5]:
        reader, epoch, count = batch["position"]
        positions[reader] = (epoch, count)
    resumed = batches(9, positions, consumed=5)
    for a, b in zip(uninterrupted[5:], resumed):
        assert a["seen"] == b["seen"] and a["position"] == b["position"] and a["skipped"] == b["skipped"]
        for name in ("vae_pixels", "pixel_values"):  # None in a batch of only unreadable samples
            assert (a[name] is None and b[name] is None) or torch.equal(a[name], b[name])
    skipped = {key for batch in uninterrupted for key, _ in batch["skipped"]}
    assert {key.rsplit(":", 1)[1] for key in skipped} == {BROKEN_IMAGE, NO_IMAGE}


# ---- vilex train, as a user runs it -------------------------------------------------------------------------
def samples_log(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()]


def checkpoint_tensors(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step) / f"{name}.safetensors")


def assert_same_files(a: Path, b: Path, step: int, names) -> None:
    for name in names:
        x, y = checkpoint_tensors(a, step, name), checkpoint_tensors(b, step, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (step, name)


def copy_back_to(run: Path, copy: Path, step: int) -> None:
    """`copy`: `run` as a crash right after its step-`step` checkpoint would have left it."""
    shutil.copytree(run, copy)
    for later, folder in ckpt.list_checkpoints(copy):
        if later > step:
            shutil.rmtree(folder)
    shutil.rmtree(copy / "pipeline")
    (copy / "report.json").unlink()


def torchrun(*args, timeout: float) -> subprocess.CompletedProcess:
    """`vilex train` in 2 processes under torchrun. A run that outlives `timeout` gets SIGABRT in each of its
    processes (torchrun starts every rank in a session of its own, so they are found as its descendants), whose
    fault handler (PYTHONFAULTHANDLER) prints each thread's stack: the test fails with where each process was
    stuck, and leaves none behind (a rank once stayed after a finished run, not reproduced)."""
    import psutil  # accelerate's dependency

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vilex.cli", "train", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        descendants = psutil.Process(process.pid).children(recursive=True)
        for child in descendants:  # the ranks and their loader workers first: torchrun would stop them unseen
            child.send_signal(signal.SIGABRT)
        psutil.wait_procs(descendants, timeout=20)
        for child in descendants:
            if child.is_running():
                child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun ran past {timeout} s; the stacks at SIGABRT:\n{stderr[-12000:]}\n{stdout[-2000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_torchrun_two_processes_split_the_shards_and_resume_exactly(tiny_ckpt, tmp_path):
    paths = write_tar_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{000000..000004}.tar")
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    # 8 steps: a rank whose reader was dealt two shards (8 samples) needs 4 of its batches, every 2nd batch
    done = torchrun("--out", run, "--data", pattern, "--max-steps", 8, "--checkpoint-every", 4,
                    "--keep-checkpoints", 0, "--num-workers", 2, *FAST, tiny_ckpt, timeout=180)
    assert "trained 8 steps" in done.stdout and "skipped 2 unreadable image files" in done.stdout

    logs = {rank: samples_log(run, rank) for rank in (0, 1)}
    for rank, lines in logs.items():  # both ranks ran every step: none waited for the other's data
        assert sorted({line["step"] for line in lines}) == list(range(1, 9)), rank
    epoch0 = {rank: [key for line in lines for key, epoch in line["samples"] if epoch == 0]
              for rank, lines in logs.items()}
    every_key = set(tar_contents(paths))
    assert len(epoch0[0]) == len(set(epoch0[0])) and len(epoch0[1]) == len(set(epoch0[1]))  # none twice on a rank
    assert not set(epoch0[0]) & set(epoch0[1])  # disjoint
    assert set(epoch0[0]) | set(epoch0[1]) == every_key  # together: every sample of the shards
    report = json.loads((run / "report.json").read_text())
    assert {key.rsplit(":", 1)[1] for key in report["unreadable"]} == {BROKEN_IMAGE, NO_IMAGE}
    assert report["unreadable_files"] == 2 and report["training_images"] is None
    state = json.loads((run / ckpt.CHECKPOINTS / ckpt.checkpoint_name(4) / "rank-1.json").read_text())
    assert set(state["stream_positions"]) == {"0", "1"}  # each worker's (epoch, samples read in it)

    # Resume from the step-4 checkpoint with 2 processes: the same samples, weights, optimizer and RNGs at step 8.
    copy_back_to(run, resumed, step=4)
    done = torchrun("--resume", resumed, "--num-workers", 2, timeout=180)
    assert "resuming" in done.stdout and "from step 4" in done.stdout
    for rank in (0, 1):
        assert samples_log(resumed, rank) == logs[rank]
    assert_same_files(run, resumed, 8, ("trainable", "optimizer", "rng-0", "rng-1"))
    losses = [[r["loss"] for r in read_metrics(folder) if "loss" in r] for folder in (run, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_parquet_trains_and_resumes_exactly(tiny_ckpt, tmp_path, capsys):
    # 8 rows in 4 row groups; 2 workers read 2 row groups each: 4 steps of 2 are one epoch, the null row included
    (tmp_path / "data").mkdir()
    path = write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", count=8, rows_per_group=2)
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    options = ["--max-steps", 4, "--checkpoint-every", 2, "--keep-checkpoints", 0, "--num-workers", 2,
               "--random-crop", *FAST]
    assert main(["train", str(tiny_ckpt), "--data", str(tmp_path / "data" / "*.parquet"), "--out", str(run),
                 *map(str, options)]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps" in out and "skipped 1 unreadable image files" in out
    report = json.loads((run / "report.json").read_text())
    assert list(report["unreadable"]) == [f"{path}:3"]  # the null image
    trained = [key for line in samples_log(run, 0) for key, _ in line["samples"]]
    assert sorted(trained) == sorted(f"{path}:{row}" for row in range(8))  # epoch 0: each row once

    copy_back_to(run, resumed, step=2)
    assert main(["train", "--resume", str(resumed), "--num-workers", "1"]) == 2  # each worker reads its own shards
    assert "run was saved with 2 per process (--num-workers 2); resume with that --num-workers, not 1" in \
        capsys.readouterr().err
    assert main(["train", "--resume", str(resumed)]) == 0
    assert samples_log(resumed, 0) == samples_log(run, 0)
    assert_same_files(run, resumed, 4, ("trainable", "optimizer", "rng-0"))
    a, b = load_file(run / FINAL_WEIGHTS), load_file(resumed / FINAL_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
