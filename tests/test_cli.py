"""The `vilex` command line on the tiny preset: outputs, sizes, and every bad input's error."""

import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vilex.cli import main
from vilex.images import load_image


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tokenize_generate_reconstruct(tiny_ckpt, image_file, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    code, out, err = run_cli(capsys, "tokenize", tiny_ckpt, image_file, image_file, "--out", tokens, "--tokens", 16)
    assert code == 0, err
    from safetensors.torch import load_file

    assert load_file(tokens)["vilex_tokens"].shape == (2, 16, 32)

    code, out, err = run_cli(capsys, "generate", tiny_ckpt, "--tokens", tokens, "--prompt", "a red house",
                             "--out", tmp_path / "gen", "--steps", 2, "--height", 32, "--width", 48, "--seed", 1)
    assert code == 0, err
    images = sorted((tmp_path / "gen").iterdir())
    assert [p.name for p in images] == ["000.png", "001.png"]
    assert Image.open(images[0]).size == (48, 32)

    code, out, err = run_cli(capsys, "reconstruct", tiny_ckpt, image_file, "--out", tmp_path / "rec", "--tokens", 4,
                             "--steps", 2)
    assert code == 0, err
    assert Image.open(tmp_path / "rec" / "red.png").size == (64, 64)
    # No staging folders are left next to the outputs.
    assert not list(tmp_path.glob(".*partial"))


def test_reconstruct_is_seeded(tiny_ckpt, image_file, tmp_path, capsys):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run_cli(capsys, "reconstruct", tiny_ckpt, image_file, "--out", tmp_path / name, "--steps", 2,
                       "--seed", seed)[0] == 0
    a, b, c = (np.asarray(Image.open(tmp_path / n / "red.png"), dtype=int) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_init_preset_and_existing_out(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "init", tmp_path / "ck", "--preset", "tiny", "--seed", 3)
    assert code == 0 and "wrote ViLex checkpoint" in out
    assert (tmp_path / "ck" / "model_index.json").is_file()
    code, _, err = run_cli(capsys, "init", tmp_path / "ck", "--preset", "tiny")
    assert code == 2 and "already exists" in err
    # every file reads as open() would make it here: safetensors' own 0600 would hide the weights from a server's user
    reference = tmp_path / "reference.txt"
    reference.write_text("")
    modes = {path.relative_to(tmp_path): stat.S_IMODE(path.stat().st_mode)
             for path in (tmp_path / "ck").rglob("*") if path.is_file()}
    assert any(str(path).endswith(".safetensors") for path in modes)
    assert set(modes.values()) == {stat.S_IMODE(reference.stat().st_mode)}, modes


def local_folders(tmp_path):
    """A "Stable Diffusion folder" in diffusers layout and a SigLIP vision folder, as a user would have them."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vilex.presets import tiny

    base = tiny(seed=1)
    sd = tmp_path / "sd"
    for name in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        getattr(base, name).save_pretrained(sd / name)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=32, patch_size=8))
    vision.save_pretrained(tmp_path / "siglip")
    base.image_processor.save_pretrained(tmp_path / "siglip")
    return base, sd, vision


def test_init_from_local_sd_and_vision_folders(tmp_path, capsys):
    base, sd, vision = local_folders(tmp_path)
    code, _, err = run_cli(capsys, "init", tmp_path / "ck", "--base", sd, "--vision", tmp_path / "siglip",
                           "--num-queries", 20)
    assert code == 0, err
    from vilex import ViLexPipeline

    pipeline = ViLexPipeline.from_pretrained(tmp_path / "ck")
    assert pipeline.num_queries == 20
    # The vision weights are the user's, the UNet is the SD folder's.
    for name, value in vision.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(pipeline.vilex.vision_model.state_dict()[name], value), name
    assert torch.equal(pipeline.unet.conv_in.weight, base.unet.conv_in.weight)

    code, _, err = run_cli(capsys, "init", tmp_path / "ck2", "--base", tmp_path / "siglip", "--vision", tmp_path / "siglip")
    assert code == 2 and "is not a Stable Diffusion folder" in err

    # A vision folder whose weight file is not its config's model: an error naming the keys, not random weights.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "siglip" / "model.safetensors")
    dropped = sorted(k for k in weights if ".layers.1." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped} | {"extra.weight": torch.zeros(3)},
              tmp_path / "siglip" / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "init", tmp_path / "ck3", "--base", sd, "--vision", tmp_path / "siglip")
    assert code == 2 and "do not match its config.json" in err
    assert "missing keys" in err and dropped[0] in err and "extra.weight" in err
    assert not (tmp_path / "ck3").exists()


def test_init_refuses_a_vision_tower_that_is_not_the_one_vilex_builds(tmp_path, capsys, monkeypatch):
    """The second check of from_local: the loaded tower's weights must fill ViLex's own vision model (built from
    the same config). Here ViLex builds one layer more than the folder holds: an error naming the keys that
    would have stayed random, and no checkpoint written."""
    import vilex.presets

    _, sd, _ = local_folders(tmp_path)
    original = vilex.presets.ViLexModel

    def deeper(vision_config, **kwargs):
        return original(vision_config={**vision_config, "num_hidden_layers": vision_config["num_hidden_layers"] + 1},
                        **kwargs)

    monkeypatch.setattr(vilex.presets, "ViLexModel", deeper)
    code, _, err = run_cli(capsys, "init", tmp_path / "ck", "--base", sd, "--vision", tmp_path / "siglip")
    assert code == 2 and "do not match the vision model of its config" in err, err
    assert "encoder.layers.2." in err and "unexpected 0 ()" in err, err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK"])
def test_image_modes_are_converted(tmp_path, mode):
    path = tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}"
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
        assert image.mode == "I;16"
    else:
        image = Image.new(mode, (8, 8))
    image.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode == "I;16":
        # Mid-gray 16-bit stays mid-gray (a plain convert would clip it to white).
        assert all(127 <= v <= 128 for v in np.asarray(rgb)[0, 0].tolist())
    if mode == "RGBA":
        # Fully transparent pixels are composited onto white.
        assert np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]


@pytest.fixture()
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    return {"corrupt": corrupt, "text": text}


def bad_cases(ckpt, image, bad, tmp):
    out = tmp / "out"
    return [
        (["reconstruct", ckpt, tmp / "missing.png", "--out", out], "IMAGE '.*missing.png': no such file"),
        (["reconstruct", ckpt, bad["corrupt"], "--out", out], "IMAGE '.*corrupt.png': not a readable image"),
        (["tokenize", ckpt, bad["text"], "--out", tmp / "t.safetensors"], "IMAGE '.*notes.txt': not a readable image"),
        (["tokenize", ckpt, image, "--out", tmp / "t.safetensors", "--tokens", 0], r"--tokens must be in 1\.\.75, got 0"),
        (["reconstruct", ckpt, image, "--out", out, "--tokens", 76], r"--tokens must be in 1\.\.75, got 76"),
        (["reconstruct", ckpt, image, "--out", out, "--tokens", 75, "--prompt", "a cat"],
         "prompt is too long: .* at most 0 text tokens fit"),
        (["reconstruct", ckpt, image, "--out", out, "--steps", 0], r"--steps must be in 1\.\.1000, got 0"),
        (["reconstruct", tmp, image, "--out", out], "is not a ViLex checkpoint"),
        (["generate", ckpt, "--tokens", tmp / "none.safetensors", "--out", out], "--tokens '.*none.safetensors': no such file"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_no_output(tiny_ckpt, image_file, bad_files, tmp_path, capsys):
    for args, message in bad_cases(tiny_ckpt, image_file, bad_files, tmp_path):
        code, out, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        import re

        assert re.search(message, lines[0]), (message, lines[0])
        assert not (tmp_path / "out").exists() and not (tmp_path / "t.safetensors").exists()
        assert not list(tmp_path.glob(".*partial*"))


def test_pickle_checkpoint_cli(tiny_ckpt, image_file, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    torch.save({}, ckpt / "vilex" / "model.pt")
    code, _, err = run_cli(capsys, "reconstruct", ckpt, image_file, "--out", tmp_path / "out")
    assert code == 2 and "pickle weights ['vilex/model.pt']; only safetensors" in err
    assert not (tmp_path / "out").exists()


def test_console_script_usage_error_exit_code(tmp_path, image_file):
    # The installed entry point, as a user runs it: argparse usage errors also exit with 2.
    result = subprocess.run([sys.executable, "-m", "vilex.cli", "reconstruct"], capture_output=True, text=True)
    assert result.returncode == 2 and "the following arguments are required" in result.stderr
    result = subprocess.run([sys.executable, "-m", "vilex.cli", "tokenize", str(tmp_path), str(image_file), "--out", "t.safetensors"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a ViLex checkpoint" in result.stderr
