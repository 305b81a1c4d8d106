"""Writing results so that a failure never leaves partial output: write to a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ViLexUsageError

TOKENS_KEY = "vilex_tokens"


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, must_be_new: bool = False):
    """Yield a temporary folder next to `out`; on success its files move into `out` (created if needed).

    With must_be_new the whole folder is renamed into place and `out` must not exist yet.
    On an exception the temporary folder is removed and `out` is untouched.
    """
    out = Path(out)
    if must_be_new and out.exists():
        raise ViLexUsageError(f"OUT '{out}' already exists; choose a new folder")
    if out.exists() and not out.is_dir():
        raise ViLexUsageError(f"--out '{out}' exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    # mkdtemp makes the folder 0700; give it the permissions a plain mkdir would (a Triton server or a
    # colleague running as another user must be able to read a checkpoint).
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        open_to_all_readers(staging)
        if must_be_new:
            os.rename(staging, out)
        else:
            out.mkdir(exist_ok=True)
            for item in sorted(staging.iterdir()):
                target = out / item.name
                if item.is_dir() and target.is_dir():  # os.replace cannot replace a non-empty folder
                    swap_folder_into_place(item, target)
                else:
                    os.replace(item, target)
            staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def open_to_all_readers(folder: Path) -> None:
    """Give every file under `folder` the mode open() would (0666, or 0777 for an executable, less the umask):
    safetensors (0.8) creates its files 0600, which would hide a checkpoint's weights from a Triton server or a
    colleague running as another user while its config files stay readable."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def swap_folder_into_place(staging: Path, out: Path) -> None:
    """Rename a finished staging folder to `out`; an existing (or empty) `out` is swapped out whole first,
    so a reader sees the old folder, nothing, or the new one, never a mix."""
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    retired.rmdir()
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def check_tokens_out(path: str | os.PathLike) -> Path:
    """A new .safetensors file for tokens: an existing file is refused, not replaced (as init, export and train
    refuse an existing folder)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ViLexUsageError(f"--out '{path}' must end in .safetensors")
    if path.exists():
        raise ViLexUsageError(f"--out '{path}' already exists; choose a new file")
    return path


def save_tokens(path: str | os.PathLike, vilex_tokens: torch.Tensor, metadata: dict) -> Path:
    """Save tokens (B, k, D) to a new safetensors file, atomically, readable as any file the user writes."""
    path = check_tokens_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    try:
        save_file({TOKENS_KEY: vilex_tokens.detach().float().contiguous().cpu()}, str(staging),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        # safetensors (0.8) creates its files with mode 0600; give it what open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o666 & ~umask)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def load_tokens(path: str | os.PathLike) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ViLexUsageError(f"--tokens '{path}': no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ViLexUsageError(f"--tokens '{path}' is not a safetensors file: {error}") from None
    if TOKENS_KEY not in tensors or tensors[TOKENS_KEY].ndim != 3:
        raise ViLexUsageError(f"--tokens '{path}' holds no '{TOKENS_KEY}' tensor of shape (B, k, D); "
                              f"make one with `vilex tokenize`")
    return tensors[TOKENS_KEY]


def output_names(paths: list[str]) -> list[str]:
    """`name.png` per input image; repeated stems get `-2`, `-3`."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names
