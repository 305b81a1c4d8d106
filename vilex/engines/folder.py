"""An export folder (`engines/NAME`) and its manifest.json.

    engines/NAME/
      manifest.json          what is here: graphs, every file with its sha256, contracts, versions, validation
      onnx/<graph>.onnx      the portable graphs (TensorRT and trtexec build from these)
      onnx/<graph>.onnx.data external weights, for graphs over protobuf's 2 GB limit
      ort/<graph>.onnx       onnxruntime-optimized graphs (only with `vilex export --optimize`)
      host/                  what the denoising loop needs besides the graphs (tokenizer, scheduler, configs,
                             the token-embedding table), so a runtime can run without the PyTorch weights
      tensorrt/              engines and the timing cache (`vilex build-engines`)
      build_engines.sh       the same builds as trtexec commands

`manifest["files"]` lists every file in the folder except manifest.json itself with its size and
sha256, so `EngineFolder.verify()` can say whether the folder is exactly what was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from vilex.errors import ViLexUsageError

from .contract import ExportOptions, GraphContract, ModelDims

MANIFEST = "manifest.json"
FORMAT = "vilex-engines"
FORMAT_VERSION = 1
# What checkpoint_sha256 hashes, recorded with it in the manifest's "source" (and in the hash cache), so that a
# manifest written before the hash was about content (issue 19) is still checked the way it was hashed.
CHECKPOINT_HASH = "tensors+configs"
# Keys a writer adds about itself rather than about the model: the folder it loaded from and its own version.
# `vilex init --preset toy` rewrites exactly these in the shipped folder's configs.
BOOKKEEPING_KEYS = frozenset({"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"})


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative posix path: {"bytes", "sha256"}} for every file under root, sorted."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative not in exclude:
            files[relative] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def tree_sha256(files: dict[str, dict]) -> str:
    """One hash for a folder: sha256 over its sorted (path, file sha256) pairs."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        digest.update(f"{relative}\0{files[relative]['sha256']}\n".encode())
    return digest.hexdigest()


def _is_checkpoint_file(relative: str) -> bool:
    from vilex.pipeline import COMPONENTS

    return relative == "model_index.json" or relative.split("/", 1)[0] in COMPONENTS


def checkpoint_paths(ckpt: str | os.PathLike) -> list[str]:
    """The files that make a checkpoint (model_index.json and the component folders), relative, sorted;
    anything else a user keeps in the folder (notes, logs) does not count."""
    from vilex.pipeline import COMPONENTS

    ckpt = Path(ckpt)
    relatives = (p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    return sorted(r for r in relatives if r == "model_index.json" or r.split("/", 1)[0] in COMPONENTS)


def tensors_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a safetensors file's tensors: each one's name, dtype, shape and bytes, in name order. The
    header's free-form `__metadata__` and the order the writer laid the tensors out in do not count."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        for name in sorted(header):
            entry = header[name]
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode() + b"\n")
            begin, end = entry["data_offsets"]
            handle.seek(8 + header_size + begin)
            remaining = end - begin
            while remaining and (block := handle.read(min(chunk, remaining))):
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def _without_bookkeeping(value):
    if isinstance(value, dict):
        return {k: _without_bookkeeping(v) for k, v in value.items() if k not in BOOKKEEPING_KEYS}
    if isinstance(value, list):
        return [_without_bookkeeping(v) for v in value]
    return value


def config_sha256(path: Path, relative: str) -> str:
    """sha256 of a JSON file's meaning: keys sorted, BOOKKEEPING_KEYS left out. In model_index.json the image
    processor's entry keeps its library only: its class name is the one that happened to load (transformers 5
    calls the PIL-backed SigLIP processor `SiglipImageProcessorPil` where torchvision is absent), while the
    processor itself is its own preprocessor_config.json, hashed as a file of its own. In the ViLex model's config a
    key added since checkpoints were first saved counts as absent at the value its absence means
    (`vilex.model.CONFIG_KEYS_ADDED`): the same model saved before and after the key existed hashes the same."""
    config = _without_bookkeeping(json.loads(path.read_text()))
    if relative == "model_index.json" and isinstance(config.get("image_processor"), list):
        config["image_processor"] = config["image_processor"][:1]
    if relative == "vilex/config.json" and isinstance(config, dict):
        from vilex.model import CONFIG_KEYS_ADDED

        for key, absent in CONFIG_KEYS_ADDED.items():
            if key in config and config[key] == absent:
                del config[key]
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_sha256(path: Path, relative: str) -> str:
    """A checkpoint file's hash by what it holds: tensors for safetensors, meaning for JSON, bytes otherwise
    (a file that does not parse as its kind is hashed by its bytes)."""
    try:
        if relative.endswith(".safetensors"):
            return tensors_sha256(path)
        if relative.endswith(".json"):
            return config_sha256(path, relative)
    except (ValueError, KeyError, TypeError, struct.error):
        pass
    return sha256_file(path)


def checkpoint_files(ckpt: str | os.PathLike, by_content: bool = True) -> dict[str, dict]:
    """checkpoint_paths with their sizes and hashes: content_sha256, or with by_content=False each file's bytes
    (sha256_file, as folder_files and the manifests written before CHECKPOINT_HASH)."""
    ckpt = Path(ckpt)
    return {r: {"bytes": (ckpt / r).stat().st_size,
                "sha256": content_sha256(ckpt / r, r) if by_content else sha256_file(ckpt / r)}
            for r in checkpoint_paths(ckpt)}


def hash_cache_path() -> Path:
    return Path(os.environ.get("VILEX_CACHE", Path.home() / ".cache" / "vilex")) / "checkpoint-sha256.json"


def _stat_signature(ckpt: Path) -> str:
    """sha256 over (path, size, mtime_ns) of the checkpoint's files: changes whenever a file is replaced,
    resized or rewritten, without reading any file."""
    digest = hashlib.sha256()
    for relative in checkpoint_paths(ckpt):
        stat = (ckpt / relative).stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def checkpoint_sha256(ckpt: str | os.PathLike, cache: bool = True) -> str:
    """The checkpoint's content hash (tree_sha256 of checkpoint_files): its weights and what its configs say,
    so the same model saved again (by `vilex init --preset toy`, another library version, from another folder)
    hashes the same, and any other weight or setting does not.

    With `cache`, it is computed once and kept in $VILEX_CACHE/checkpoint-sha256.json (default
    ~/.cache/vilex) under the folder's resolved path and the (path, size, mtime) signature of its files,
    as git's index does: a later run reads the files' metadata instead of hashing gigabytes again, and
    any rewritten file changes the signature and is hashed anew. A cache that cannot be read or written
    only costs the hashing."""
    ckpt = Path(ckpt).resolve()
    if not cache:
        return tree_sha256(checkpoint_files(ckpt))
    signature = _stat_signature(ckpt)
    store = hash_cache_path()
    try:
        entries = json.loads(store.read_text())
    except (OSError, ValueError):
        entries = {}
    entry = entries.get(str(ckpt)) if isinstance(entries, dict) else None
    if isinstance(entry, dict) and entry.get("signature") == signature and entry.get("hash") == CHECKPOINT_HASH \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = tree_sha256(checkpoint_files(ckpt))
    entries = entries if isinstance(entries, dict) else {}
    entries[str(ckpt)] = {"signature": signature, "hash": CHECKPOINT_HASH, "sha256": digest}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(store, entries)
    except OSError:
        pass  # a read-only home: the hash is right, only not remembered
    return digest


def write_json_atomic(path: Path, data: dict) -> None:
    staging = path.with_name(f".{path.name}.partial")
    try:
        staging.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


class EngineFolder:
    """Read access to an export folder: its manifest, contracts, graph files and host-side files."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | os.PathLike, what: str = "--engines") -> "EngineFolder":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ViLexUsageError(f"{what} '{root}' is not an export folder (no {MANIFEST}); "
                                  f"make one with `vilex export CKPT --out {root}`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ViLexUsageError(f"{what} '{root}': {MANIFEST} is not valid JSON: {error}") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ViLexUsageError(f"{what} '{root}': {MANIFEST} is not a {FORMAT} v{FORMAT_VERSION} manifest "
                                  f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
        folder = cls(root, manifest)
        folder.check_sizes()
        return folder

    # ---- contents ----------------------------------------------------------------------------------
    @property
    def graph_names(self) -> list[str]:
        return list(self.manifest["graphs"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.manifest["dims"])

    @property
    def options(self) -> ExportOptions:
        return ExportOptions.from_dict(self.manifest["options"])

    def contract(self, graph: str) -> GraphContract:
        return GraphContract.from_dict(self.manifest["graphs"][graph]["contract"])

    def contracts(self) -> dict[str, GraphContract]:
        return {graph: self.contract(graph) for graph in self.graph_names}

    def side_range(self, side: str) -> tuple[int, int]:
        """The output heights (side "height") or widths ("width") in pixels the export takes, whichever runtime
        runs it: the UNet contract's latent axis times the VAE factor."""
        axis = self.contract("unet").axes[f"latent_{side}"]
        factor = self.dims.vae_scale_factor
        return axis.min * factor, axis.max * factor

    def graph_precision(self, graph: str) -> str:
        return self.manifest["graphs"][graph]["precision"]

    def graph_path(self, graph: str, variant: str = "onnx") -> Path:
        """The graph file: variant "onnx" (portable) or "ort" (onnxruntime-optimized, when exported)."""
        files = self.manifest["graphs"][graph]["files"]
        if variant not in files:
            raise ViLexUsageError(f"--engines '{self.root}' has no '{variant}' variant of graph '{graph}' "
                                  f"(it has {sorted(files)})")
        return self.root / files[variant]

    def has_variant(self, variant: str) -> bool:
        return all(variant in self.manifest["graphs"][g]["files"] for g in self.graph_names)

    def onnxruntime_variant(self, target: str) -> str:
        """The variant onnxruntime runs on `target` ("cpu" or "gpu"): "ort" where the export fused its graphs for
        that target (`--optimize`; an int8 export's `ort/` UNet holds the CPU's integer kernels), else "onnx".
        The one rule for onnxruntime in-process and for Triton's graph and pipeline models."""
        return "ort" if self.manifest.get("optimize") == target and self.has_variant("ort") else "onnx"

    @property
    def host_dir(self) -> Path:
        return self.root / "host"

    # ---- integrity ---------------------------------------------------------------------------------
    def check_sizes(self) -> None:
        """Cheap check on open: every listed file exists with its recorded size (catches a truncated copy)."""
        for relative, entry in self.manifest["files"].items():
            path = self.root / relative
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ViLexUsageError(f"--engines '{self.root}': '{relative}' is missing or has the wrong size "
                                      f"(manifest says {entry['bytes']} bytes); re-export the folder")

    def verify(self) -> list[str]:
        """Every difference between the folder and its manifest (empty when they agree): hashes checked."""
        actual = folder_files(self.root, exclude=(MANIFEST,))
        problems = []
        for relative, entry in self.manifest["files"].items():
            if relative not in actual:
                problems.append(f"missing: {relative}")
            elif actual[relative]["sha256"] != entry["sha256"]:
                problems.append(f"changed: {relative}")
        problems += [f"not in manifest: {relative}" for relative in actual if relative not in self.manifest["files"]]
        return problems

    def check_source(self, ckpt: str | os.PathLike) -> None:
        """Raise unless CKPT is the checkpoint this folder was exported from (by content hash).

        Graphs from one checkpoint with another's tokenizer or embedding table would run and give
        wrong images without any error, so a mismatch is refused.
        """
        source = self.manifest["source"]
        expected = source["sha256"]
        if source.get("hash") == CHECKPOINT_HASH:
            actual = checkpoint_sha256(ckpt)
        else:  # exported before the hash was about content: it hashed the files' bytes
            actual = tree_sha256(checkpoint_files(ckpt, by_content=False))
        if actual != expected:
            raise ViLexUsageError(
                f"--engines '{self.root}' was exported from a different checkpoint "
                f"({self.manifest['source']['checkpoint']}, sha256 {expected[:12]}) than CKPT '{ckpt}' "
                f"(sha256 {actual[:12]}); re-export with `vilex export {ckpt} --out {self.root} --replace`")

    # ---- updates (build-engines) --------------------------------------------------------------------
    def update(self, changes: dict, files: list[str] = ()) -> None:
        """Merge top-level `changes` into the manifest, (re)hash the listed files (relative paths; a
        missing one is dropped) and write the manifest atomically. Other entries are left as recorded,
        so an update never vouches for graph files it did not write."""
        self.manifest.update(changes)
        for relative in files:
            path = self.root / relative
            if path.is_file():
                self.manifest["files"][relative] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            else:
                self.manifest["files"].pop(relative, None)
        self.manifest["files"] = dict(sorted(self.manifest["files"].items()))
        write_json_atomic(self.root / MANIFEST, self.manifest)
