"""What makes two checkpoint folders the same checkpoint (issue 19, items 13 and 22): their weights and what their
configs say, not which folder or library version wrote them, nor what else was installed when they were saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vilex.cli import main
from vilex.engines.folder import (CHECKPOINT_HASH, EngineFolder, checkpoint_files, checkpoint_sha256,
                                  tree_sha256)
from vilex.errors import ViLexUsageError
from vilex.toyworld.shipped import checkpoint_path

STOCK = ["transformers", "SiglipImageProcessor"]


def file_sha256(ckpt) -> str:
    """The hash before issue 19: every file's bytes."""
    return tree_sha256(checkpoint_files(ckpt, by_content=False))


def saved_again(ckpt, out):
    """CKPT as another writer would save the same model: other `_name_or_path` and library versions, the image
    processor under its PIL class name (transformers 5 without torchvision), other JSON layout, and safetensors
    files with other metadata and another tensor order."""
    shutil.copytree(ckpt, out)
    for path in out.rglob("*.json"):
        config = json.loads(path.read_text())
        if "_name_or_path" in config or path.name == "model_index.json":
            config.update(_name_or_path="/somewhere/else", _diffusers_version="0.40.0")
        if path.name == "model_index.json":
            config["image_processor"] = ["transformers", "SiglipImageProcessorPil"]
        if "transformers_version" in config:
            config["transformers_version"] = "5.0.0"
        path.write_text(json.dumps(dict(reversed(config.items())), indent=4))
    for path in out.rglob("*.safetensors"):
        tensors = load_file(path)
        save_file(dict(reversed(tensors.items())), path, metadata={"format": "pt", "writer": "another"})
    return out


def test_vilex_init_toy_is_the_shipped_checkpoint(tmp_path, capsys):
    """Item 13: `vilex init --preset toy` rewrote `_name_or_path` and `transformers_version` in the shipped folder's
    configs, so it hashed differently and an export of one was refused with the other. Item 22: its
    model_index.json names the stock image-processor class whatever is installed (the shipped folder, saved without
    torchvision, names `SiglipImageProcessorPil`)."""
    out = tmp_path / "toy"
    assert main(["init", str(out), "--preset", "toy"]) == 0, capsys.readouterr().err
    assert json.loads((out / "model_index.json").read_text())["image_processor"] == STOCK
    shipped = checkpoint_path()
    assert file_sha256(out) != file_sha256(shipped)  # the files do differ, as the issue found
    assert checkpoint_sha256(out, cache=False) == checkpoint_sha256(shipped, cache=False)
    # An export's staleness check, as the manifest of an export of the shipped folder records it.
    export = EngineFolder(tmp_path / "engines", {"source": {"checkpoint": str(shipped), "hash": CHECKPOINT_HASH,
                                                            "sha256": checkpoint_sha256(shipped)}})
    export.check_source(out)


def test_an_export_accepts_the_same_weights_saved_again_and_refuses_others(tiny_ckpt, tiny_engines, tmp_path):
    folder = EngineFolder.open(tiny_engines)
    assert folder.manifest["source"]["hash"] == CHECKPOINT_HASH
    again = saved_again(tiny_ckpt, tmp_path / "again")
    assert file_sha256(again) != file_sha256(tiny_ckpt)
    folder.check_source(again)

    # Another weight, or another setting in a config, is another checkpoint.
    weights = again / "vilex" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, weights)
    with pytest.raises(ViLexUsageError, match="was exported from a different checkpoint"):
        folder.check_source(again)
    # A checkpoint saved before the ViLex config had `mix_adapter_hidden` and `mix_adapter_words` (the tenth toy
    # checkpoint is one) is the same as one that says 0 (none) and False, and another with an adapter is not.
    older = saved_again(tiny_ckpt, tmp_path / "older")
    vilex_config = older / "vilex" / "config.json"
    values = json.loads(vilex_config.read_text())
    assert values.pop("mix_adapter_hidden") == 0
    assert values.pop("mix_adapter_words") is False
    vilex_config.write_text(json.dumps(values))
    folder.check_source(older)
    vilex_config.write_text(json.dumps({**values, "mix_adapter_hidden": 8}))
    with pytest.raises(ViLexUsageError, match="was exported from a different checkpoint"):
        folder.check_source(older)
    other = saved_again(tiny_ckpt, tmp_path / "other-scheduler")
    config = other / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    with pytest.raises(ViLexUsageError, match="was exported from a different checkpoint"):
        folder.check_source(other)


def test_an_export_made_before_the_content_hash_is_still_checked_by_its_bytes(tiny_ckpt, tmp_path):
    legacy = EngineFolder(tmp_path / "engines", {"source": {"checkpoint": str(tiny_ckpt),
                                                            "sha256": file_sha256(tiny_ckpt)}})
    legacy.check_source(tiny_ckpt)
    with pytest.raises(ViLexUsageError, match="was exported from a different checkpoint"):
        legacy.check_source(saved_again(tiny_ckpt, tmp_path / "again"))


def test_a_cached_hash_of_the_older_kind_is_not_reused(tiny_ckpt, tmp_path, monkeypatch):
    from vilex.engines import folder as folder_module

    copy = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    monkeypatch.setattr(folder_module, "hash_cache_path", lambda: tmp_path / "checkpoint-sha256.json")
    content = checkpoint_sha256(copy)
    entries = json.loads((tmp_path / "checkpoint-sha256.json").read_text())
    entry = entries[str(copy.resolve())]
    assert entry["hash"] == CHECKPOINT_HASH and entry["sha256"] == content
    # As a cache written before issue 19 left it: the files' byte hash under the same signature.
    entries[str(copy.resolve())] = {"signature": entry["signature"], "sha256": file_sha256(copy)}
    (tmp_path / "checkpoint-sha256.json").write_text(json.dumps(entries))
    assert checkpoint_sha256(copy) == content


@pytest.mark.parametrize("recorded", ["SiglipImageProcessor", "SiglipImageProcessorPil"])
def test_either_image_processor_name_loads_and_is_saved_as_the_stock_one(tiny_ckpt, tmp_path, recorded):
    """Item 22: a checkpoint that names the image processor either way (the stock name, or the PIL one that
    transformers 5 gave where torchvision was absent) loads, preprocesses as its preprocessor_config.json says,
    and a training run's pipeline from it names the stock class."""
    from vilex import ViLexPipeline
    from vilex.training.results import save_pipeline_folder

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["image_processor"] == STOCK  # the tiny preset, saved here
    index["image_processor"] = ["transformers", recorded]
    (ckpt / "model_index.json").write_text(json.dumps(index))
    pipeline = ViLexPipeline.from_pretrained(ckpt)
    size = pipeline.vilex.config.vision_config["image_size"]
    from PIL import Image

    pixels = pipeline.preprocess([Image.new("RGB", (48, 40), (255, 0, 0))])
    assert pixels.shape == (1, 3, size, size)
    assert torch.allclose(pixels[0, 0], torch.ones(size, size)) and torch.allclose(pixels[0, 1], -torch.ones(size, size))
    out = save_pipeline_folder(str(ckpt), pipeline.vilex.state_dict(), None, tmp_path / "trained")
    assert json.loads((out / "model_index.json").read_text())["image_processor"] == STOCK
