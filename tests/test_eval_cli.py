"""`vilex eval` as a user runs it: on any checkpoint and a folder of images (PSNR and SSIM), with its
figures checked against an independent path (`vilex reconstruct`'s PNG, measured with numpy)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from vilex.cli import main


def test_eval_on_a_folder_matches_psnr_of_reconstruct_output(tiny_ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:32] = (200, 40, 40)
    pixels[32:] = rng.integers(0, 255, (32, 64, 3))
    Image.fromarray(pixels).save(folder / "a.png")

    assert main(["reconstruct", str(tiny_ckpt), str(folder / "a.png"), "--out", str(tmp_path / "rec"), "--tokens", "1",
                 "--steps", "2", "--seed", "0"]) == 0
    assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--n", "1", "--tokens", "1,all", "--steps", "2",
                 "--sweep-n", "0", "--out", str(tmp_path / "eval")]) == 0

    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {row["condition"]: row for row in result["rows"]}
    assert set(rows) == {"vilex-1", "vilex-75", "unconditional", "random-tokens"}  # no captions, no probe
    assert "probe_agreement" not in rows["vilex-1"] and result["probe_on_inputs"] is None
    reconstruction = np.asarray(Image.open(tmp_path / "rec" / "a.png"), dtype=np.float64) / 255
    mse = ((reconstruction - pixels / 255) ** 2).mean()
    assert abs(rows["vilex-1"]["psnr"]["mean"] - 10 * np.log10(1 / mse)) < 1e-3
    assert (tmp_path / "eval" / "grid.png").is_file() and (tmp_path / "eval" / "results.md").is_file()


def test_words_rows_match_reconstruct_with_the_same_words(tiny_ckpt, tmp_path, capsys):
    """`--words TEXT` adds a row of all tokens + TEXT (or the longest prefix that fits beside it: 70 of the tiny
    preset's 75 beside this text, as `vilex reconstruct` says) with text-free guidance, also with --no-baselines;
    its PSNR is that of `vilex reconstruct --prompt TEXT --text-guidance`'s PNG, measured with numpy."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = (40, 40, 200)
    Image.fromarray(pixels).save(folder / "a.png")
    assert main(["reconstruct", str(tiny_ckpt), str(folder / "a.png"), "--out", str(tmp_path / "rec"), "--steps", "2",
                 "--prompt", "a red square", "--text-guidance", "3", "--seed", "0"]) == 2
    assert "at most 70 ViLex tokens leave room for it" in capsys.readouterr().err
    assert main(["reconstruct", str(tiny_ckpt), str(folder / "a.png"), "--out", str(tmp_path / "rec"), "--steps", "2",
                 "--prompt", "a red square", "--text-guidance", "3", "--seed", "0", "--tokens", "70"]) == 0
    assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--n", "1", "--tokens", "1", "--steps", "2",
                 "--no-baselines", "--sweep-n", "0", "--words", "a red square", "--words", "blue",
                 "--edit-guidance", "3", "--out", str(tmp_path / "eval")]) == 0
    rows = {row["condition"]: row for row in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    assert list(rows) == ["vilex-1", "vilex + 'a red square'", "vilex + 'blue'"]
    assert rows["vilex + 'a red square'"]["tokens"] == 70 and 70 < rows["vilex + 'blue'"]["tokens"] < 75
    reconstruction = np.asarray(Image.open(tmp_path / "rec" / "a.png"), dtype=np.float64) / 255
    mse = ((reconstruction - pixels / 255) ** 2).mean()
    assert abs(rows["vilex + 'a red square'"]["psnr"]["mean"] - 10 * np.log10(1 / mse)) < 1e-3
    assert rows["vilex + 'blue'"]["psnr"]["mean"] != rows["vilex + 'a red square'"]["psnr"]["mean"]

    for words, message in (("  ", "--words takes a text to put beside the tokens, got '  '"),
                           ("word " * 80, "leaves no room for a ViLex token beside it")):
        assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--words", words,
                     "--out", str(tmp_path / "e")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_rejects_bad_options(tiny_ckpt, tmp_path, capsys):
    assert main(["eval", str(tiny_ckpt), "--tokens", "0", "--out", str(tmp_path / "e")]) == 2
    assert "--tokens must be in 1..75, got 0" in capsys.readouterr().err
    assert main(["eval", str(tiny_ckpt), "--backend", "onnxruntime", "--out", str(tmp_path / "e")]) == 2
    assert "--backend onnxruntime needs an export folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_ckpt), "--sweep-schedulers", "euler", "--out", str(tmp_path / "e")]) == 2
    assert "--sweep-schedulers takes ddim, dpm++, got 'euler'" in capsys.readouterr().err
    # The generation settings are checked by vilex.settings, as everywhere else: NaN is refused, not run
    assert main(["eval", str(tiny_ckpt), "--guidance", "nan", "--out", str(tmp_path / "e")]) == 2
    assert "--guidance must be" in capsys.readouterr().err
    assert main(["eval", str(tiny_ckpt), "--sweep-steps", "10,0", "--out", str(tmp_path / "e")]) == 2
    assert "--sweep-steps must be in 1..1000, got 0" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_on_a_folder_skips_unreadable_files_and_says_when_it_leaves_the_caption_out(tiny_ckpt, tmp_path, capsys):
    """Unreadable files are skipped and listed, as `vilex train` does; a caption baseline that only some images
    could have is left out with a notice; --sweep-n's default follows --n (and the images there are)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, color in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        Image.new("RGB", (64, 64), color).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a red square\n")  # b has no caption
    (folder / "c.png").write_bytes(b"not a png")

    assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--n", "8", "--tokens", "1", "--steps", "1",
                 "--sweep-steps", "1", "--sweep-schedulers", "ddim", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert f"skipped unreadable {folder / 'c.png'}" in out
    assert "caption baseline left out: 1 of 2 images have a name.txt caption" in out
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "caption" not in {row["condition"] for row in result["rows"]}
    assert result["config"]["sweep_n"] == 2  # min(32, the 2 readable images), not 32 against --n 8


def test_the_sweep_covers_each_guidance_and_matches_the_main_table_at_its_own(tiny_ckpt, tmp_path, capsys):
    """`--sweep-guidance` adds guidance to the sweep: a row per guidance (and steps, tokens), in the JSON and the
    markdown. At the main table's own guidance, steps and the checkpoint's scheduler (DDIM) a sweep row is the
    main row's images again, so its PSNR is the main row's, made by another path; another guidance moves it.
    A value that is not a number, or out of range, is refused naming the flag."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(2).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--n", "1", "--tokens", "4", "--steps", "2",
                 "--guidance", "3", "--no-baselines", "--sweep-steps", "2", "--sweep-schedulers", "ddim",
                 "--sweep-guidance", "1,3", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    main_row = next(r for r in result["rows"] if not r.get("sweep"))
    sweep = {r["guidance"]: r for r in result["rows"] if r.get("sweep")}
    assert sorted(sweep) == [1.0, 3.0] and all(r["steps"] == 2 and r["tokens"] == 4 for r in sweep.values())
    assert sweep[3.0]["psnr"]["mean"] == main_row["psnr"]["mean"]
    assert sweep[1.0]["psnr"]["mean"] != main_row["psnr"]["mean"]
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| backend | scheduler | guidance | steps | tokens |" in table
    assert "| torch | ddim | 1 | 2 | 4 |" in table and "| torch | ddim | 3 | 2 | 4 |" in table

    for value, message in (("3,x", "--sweep-guidance takes comma-separated numbers, got '3,x'"),
                           ("3,101", "--sweep-guidance must be in 0..100, got 101"),
                           ("", "--sweep-guidance takes at least one guidance scale, got none")):
        assert main(["eval", str(tiny_ckpt), "--sweep-guidance", value, "--out", str(tmp_path / "e")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_compares_each_later_backend_with_the_first(tiny_ckpt, tiny_engines, tmp_path):
    """With several backends, each later backend's rows carry the PSNR between its reconstructions and the first
    backend's, checked against `vilex reconstruct`'s PNGs of both backends, measured with numpy."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    common = ["--tokens", "4", "--steps", "2", "--seed", "0"]
    assert main(["reconstruct", str(tiny_ckpt), str(folder / "a.png"), "--out", str(tmp_path / "torch"), *common]) == 0
    assert main(["reconstruct", str(tiny_ckpt), str(folder / "a.png"), "--out", str(tmp_path / "ort"), *common,
                 "--backend", "onnxruntime", "--engines", str(tiny_engines)]) == 0
    assert main(["eval", str(tiny_ckpt), "--images", str(folder), "--n", "1", "--tokens", "4", "--steps", "2",
                 "--backend", f"torch,onnxruntime={tiny_engines}", "--no-baselines", "--sweep-n", "0",
                 "--out", str(tmp_path / "eval")]) == 0

    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert [("psnr_vs_first_backend" in r) for r in rows] == [False, True]
    paired = rows[1]["psnr_vs_first_backend"]
    a, b = (np.asarray(Image.open(tmp_path / name / "a.png"), dtype=np.float64) / 255 for name in ("torch", "ort"))
    mse = ((a - b) ** 2).mean()
    if mse == 0:
        assert paired == {"identical": 1, "of": 1, "psnr": None}
    else:
        assert paired["identical"] == 0 and abs(paired["psnr"]["mean"] - 10 * np.log10(1 / mse)) < 1e-3
    assert "PSNR vs the first backend" in (tmp_path / "eval" / "results.md").read_text()
