"""Running the pipeline from an export folder alone, without the PyTorch weights.

The denoising loop (`ViLexPipeline.generate`) needs, besides the four graphs, only small host-side
pieces: the tokenizer, the scheduler's config, the image processor's config, the component configs
(sizes such as the VAE scale factor and the UNet's channels) and the text encoder's token-embedding
table (the prompt builder looks up BOS/EOS/PAD and text tokens there). `vilex export` copies them to
`engines/NAME/host/` in the checkpoint's own layout:

    host/model_index.json, tokenizer/, scheduler/, image_processor/, {vilex,text_encoder,unet,vae}/config.json
    host/text_encoder/token_embedding.safetensors     the (vocab, D) table, fp32
    host/vilex/mix_adapter.safetensors                 the ViLex model's mixing adapter, fp32 (only where it has one:
                                                       tokens beside text pass through it on the host)

`pipeline_from_engines` builds a `ViLexPipeline` from them whose model components are created on
PyTorch's meta device (configs, no memory, cannot run) and sets a backend that runs the graphs; the
loop is the same code as with the PyTorch weights.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vilex.errors import ViLexUsageError

from .folder import EngineFolder

TOKEN_EMBEDDING_FILE = "text_encoder/token_embedding.safetensors"
MIX_ADAPTER_FILE = "vilex/mix_adapter.safetensors"
WEIGHT_SUFFIXES = (".safetensors",)  # check_checkpoint has already refused pickle files
MODEL_COMPONENTS = ("vilex", "text_encoder", "unet", "vae")


def save_host_files(pipeline, ckpt: Path, dest: Path, files: list[str]) -> None:
    """Copy the checkpoint's non-weight `files` (relative paths) to `dest` in the same layout and add the
    token-embedding table, and the mixing adapter where the ViLex model has one."""
    for relative in files:
        path = Path(ckpt) / relative
        if path.suffix in WEIGHT_SUFFIXES:
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    table = pipeline.text_encoder.get_input_embeddings().weight.detach().float().contiguous().cpu()
    (dest / TOKEN_EMBEDDING_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": table}, str(dest / TOKEN_EMBEDDING_FILE))
    adapter = pipeline.vilex.mix_adapter
    if adapter is not None:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()},
                  str(dest / MIX_ADAPTER_FILE))


# What model_index.json may name per component: a host folder is data, and data must not choose which
# modules get imported. The same libraries a checkpoint folder loads from.
COMPONENT_LIBRARIES = {"tokenizer": ("transformers",), "image_processor": ("transformers",),
                       "text_encoder": ("transformers",), "unet": ("diffusers",), "vae": ("diffusers",),
                       "vilex": ("vilex.model",)}


def _component_class(name: str, entry, where: Path):
    library, class_name = entry
    if library not in COMPONENT_LIBRARIES[name]:
        raise ViLexUsageError(f"'{where}' names {library}.{class_name} for {name}; it must come from "
                              f"{' or '.join(COMPONENT_LIBRARIES[name])}")
    cls = getattr(importlib.import_module(library), str(class_name), None)
    if not isinstance(cls, type):
        raise ViLexUsageError(f"'{where}' names {library}.{class_name} for {name}, which {library} does not have")
    return cls


def pipeline_from_engines(engines: str | os.PathLike | EngineFolder, backend=None):
    """A ViLexPipeline running on `backend` (default: onnxruntime over the folder's graphs), built
    from the folder's host files only."""
    from vilex.pipeline import ViLexPipeline, load_scheduler

    folder = engines if isinstance(engines, EngineFolder) else EngineFolder.open(engines)
    host = folder.host_dir
    index = json.loads((host / "model_index.json").read_text())
    components = {}
    index_path = host / "model_index.json"
    for name in ("tokenizer", "image_processor"):
        components[name] = _component_class(name, index[name], index_path).from_pretrained(host / name)
    # The scheduler is the class its own config names, checked to be a diffusers scheduler, as when
    # loading the checkpoint.
    components["scheduler"] = load_scheduler(host / "scheduler")
    with torch.device("meta"):  # configs only: the graphs hold the weights
        for name in MODEL_COMPONENTS:
            cls = _component_class(name, index[name], index_path)
            if hasattr(cls, "load_config"):  # diffusers ConfigMixin (also ViLexModel)
                components[name] = cls.from_config(cls.load_config(host / name))
            else:  # transformers
                components[name] = cls(cls.config_class.from_pretrained(host / name))
    table = load_file(str(host / TOKEN_EMBEDDING_FILE))["weight"]
    components["text_encoder"].set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=True))
    adapter = components["vilex"].mix_adapter
    if adapter is not None:  # host-side weights, like the table: the prompt builder runs it
        path = host / MIX_ADAPTER_FILE
        if not path.is_file():
            raise ViLexUsageError(f"'{folder.root}': its vilex config has a mixing adapter, but {path} is missing; "
                                  f"export the checkpoint again")
        adapter.to_empty(device="cpu").load_state_dict(load_file(str(path)))
        adapter.requires_grad_(False)
    pipeline = ViLexPipeline(**components)
    if backend is None:
        from vilex.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(folder)
    return pipeline.set_backend(backend)
