"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

    RUN_DIR/checkpoints/step-00001000/
        trainable.safetensors   the trainable ViLex weights, by parameter name (float32)
        optimizer.safetensors   AdamW state tensors, "<param index>.<key>" (step, exp_avg, exp_avg_sq)
        ema.safetensors         EMA shadow weights by parameter name (with --ema)
        rng-<rank>.safetensors  per process: the training generator, torch CPU and CUDA RNG states
        rank-<rank>.json        per process: batches consumed, unreadable files met, shard readers' positions
        state.json              step, optimizer param groups, LR schedule, grad scaler, EMA counters;
                                written last

A checkpoint is built in `.step-XXXXXXXX.partial` and renamed into place only when complete, so a
crash mid-save leaves the previous checkpoint as the latest one and nothing half-written under a real
name. No pickle: every file here loads without running code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ViLexUsageError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _NAME.match(folder.name)
        if match and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder a checkpoint is written into before it is renamed (the same name on every rank)."""
    return Path(run_dir) / CHECKPOINTS / f".{checkpoint_name(step)}.partial"


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Delete leftovers of saves that crashed."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for folder in root.glob(".step-*.partial"):
            shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def commit(staging: Path, final: Path) -> Path:
    """Flush the staged files to disk and rename the folder into place (the atomic step)."""
    for item in staging.iterdir():
        _fsync(item)
    if final.exists():  # only when a run re-saves a step it already saved; keep no mixed folder
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync(final.parent)
    return final


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the `keep` newest checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, folder in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


# ---- optimizer and RNG state as tensors + JSON ---------------------------------------------------------
def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON turned the tuple into a list
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def load_checkpoint_files(folder: Path, rank: int) -> dict:
    """Read a checkpoint folder: {"state", "rank", "trainable", "optimizer", "rng", "ema"?}."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise ViLexUsageError(f"checkpoint '{folder}' is incomplete: no {STATE_FILE}")
    rank_json, rng_file = folder / f"rank-{rank}.json", folder / f"rng-{rank}.safetensors"
    if not rank_json.is_file() or not rng_file.is_file():
        raise ViLexUsageError(
            f"checkpoint '{folder}' has no state for process {rank}: resume with the number of processes "
            f"the run was saved with"
        )
    loaded = {
        "state": json.loads(state_path.read_text()),
        "rank": json.loads(rank_json.read_text()),
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": load_file(str(folder / "optimizer.safetensors")),
        "rng": load_file(str(rng_file)),
    }
    if (folder / "ema.safetensors").is_file():
        loaded["ema"] = load_file(str(folder / "ema.safetensors"))
    return loaded
