"""`vilex toyworld train-base` end to end at CI size: every stage runs through the CLI, the learning curve and the
VAE's held-out PSNR are logged, the decoder stage leaves the encoder (the UNet's latent space) untouched, and a
rerun is a resume that refuses other options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vilex import ViLexPipeline
from vilex.cli import main
from vilex.toyworld import curve

TINY_RUN = ["--num-scenes", "64", "--vae-steps", "3", "--unet-steps", "2", "--decoder-steps", "3", "--vae-batch-size", "4",
            "--unet-batch-size", "4", "--warmup-steps", "1", "--checkpoint-every", "3", "--curve-every", "2",
            "--curve-n", "2"]
CHECK = ["--vae-check-scenes", "16"]  # the VAE's logged PSNR on 16 held-out scenes, not 256: a fifth of the test's time


@pytest.mark.timeout(600)
def test_train_base_runs_every_stage_logs_the_curve_and_resumes(tmp_path, capsys):
    out = tmp_path / "base"
    detailed = ["--detailed-captions", "0.5"]  # the curve then measures detailed captions too
    assert main(["toyworld", "train-base", str(out), *TINY_RUN, *CHECK, *detailed]) == 0
    log = capsys.readouterr().out
    assert '"stage": "vae", "step": 3, "heldout_psnr_db"' in log and '"stage": "vae_decoder", "step": 3' in log
    points = curve.read_points(out)
    assert [p["step"] for p in points] == [0, 2] and (out / curve.PLOT_FILE).is_file()
    assert all(p[curve.DETAILED + "center_error_px"] >= 0 and curve.DETAILED + "shape" in p and p[curve.DIGITS] == 1
               for p in points)
    report = json.loads((out / "report.json").read_text())
    assert report["vae_heldout_psnr_db"] > 0 and report["device"] == "cpu"

    # The decoder stage trains the decoder only: the encoder is the VAE stage's, so the UNet's latents hold.
    pipeline = ViLexPipeline.from_pretrained(out / "pipeline")
    vae_stage = load_file(str(next((out / "vae" / "checkpoints").iterdir()) / "trainable.safetensors"))
    shipped = pipeline.vae.state_dict()
    encoder = [k for k in shipped if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in shipped if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(shipped[k], vae_stage["vae." + k]) for k in encoder)
    assert not all(torch.equal(shipped[k], vae_stage["vae." + k]) for k in decoder)

    # A rerun resumes finished stages (nothing retrained) and refuses other options.
    assert main(["toyworld", "train-base", str(out), *TINY_RUN, *CHECK, *detailed]) == 0
    assert "vae_decoder: resumed at step 3" in capsys.readouterr().out
    assert main(["toyworld", "train-base", str(out), *TINY_RUN[:-2], "--curve-n", "3", *detailed]) == 2
    assert "holds a run with other options" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_init_from_keeps_the_vae_and_starts_from_the_text_encoder_and_unet(tmp_path, capsys):
    """`--init-from` a trained base (the shipped one): no VAE stage, its VAE encoder kept exactly; the text encoder
    and UNet start from its weights (one AdamW step moves each weight by about the learning rate, 5e-4; a fresh
    initialization differs by far more); with --unet-steps 0 they stay exactly as they were and only the decoder
    trains; a folder that is not a base is refused, naming the flag, and --unet-steps 0 without a warm start too."""
    from vilex.toyworld.shipped import checkpoint_path

    source = ViLexPipeline.from_pretrained(checkpoint_path())
    out = tmp_path / "warm"
    run = ["--init-from", str(checkpoint_path()), *TINY_RUN[:4], "--unet-steps", "1", "--decoder-steps", "1",
           *TINY_RUN[8:12], "--warmup-steps", "0", "--curve-every", "0", *CHECK]
    assert main(["toyworld", "train-base", str(out), *run]) == 0
    assert '"stage": "vae", "from":' in capsys.readouterr().out and not (out / "vae").exists()
    warm = ViLexPipeline.from_pretrained(out / "pipeline")
    encoder = {k: v for k, v in source.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    assert all(torch.equal(v, warm.vae.state_dict()[k]) for k, v in encoder.items())
    for name in ("unet", "text_encoder"):
        before, after = getattr(source, name).state_dict(), getattr(warm, name).state_dict()
        moved = max(float((after[k] - v).abs().max()) for k, v in before.items())
        assert moved < 2e-3, (name, moved)

    # --unet-steps 0: the text encoder and UNet exactly as they were; only the decoder trains.
    run = ["--init-from", str(checkpoint_path()), *TINY_RUN[:4], "--unet-steps", "0", "--decoder-steps", "1",
           *TINY_RUN[8:10], "--warmup-steps", "0", *CHECK]
    assert main(["toyworld", "train-base", str(tmp_path / "decoder-only"), *run]) == 0
    tuned = ViLexPipeline.from_pretrained(tmp_path / "decoder-only" / "pipeline")
    for name in ("unet", "text_encoder"):
        before, after = getattr(source, name).state_dict(), getattr(tuned, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), name
    vae_before, vae_after = source.vae.state_dict(), tuned.vae.state_dict()
    assert all(torch.equal(v, vae_after[k]) for k, v in encoder.items())
    assert not all(torch.equal(vae_after[k], v) for k, v in vae_before.items() if k.startswith("decoder."))

    assert main(["toyworld", "train-base", str(tmp_path / "other"), "--init-from", str(tmp_path)]) == 2
    assert "--init-from must be a trained base's pipeline folder" in capsys.readouterr().err
    assert main(["toyworld", "train-base", str(tmp_path / "other"), *TINY_RUN[:4], "--unet-steps", "0"]) == 2
    assert "--unet-steps 0 keeps a warm start's text encoder and UNet as they are: it needs --init-from" in \
        capsys.readouterr().err
    # With --unet-steps 0: nothing to train, options of the skipped stage, a warm start without what is kept.
    for extra, message in ((["--decoder-steps", "0"], "--unet-steps 0 with --decoder-steps 0 trains nothing"),
                           (["--unet-batch-size", "4", "--no-zero-terminal-snr"],
                            "--unet-batch-size, --no-zero-terminal-snr only act on the text-to-image stage")):
        assert main(["toyworld", "train-base", str(tmp_path / "other"), *run, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["toyworld", "train-base", str(tmp_path / "other"), *TINY_RUN, "--detail-digits", "2"]) == 2
    assert "--detail-digits sets the digits of the detailed captions: it needs --detailed-captions" in \
        capsys.readouterr().err
    assert main(["toyworld", "train-base", str(tmp_path / "other"), *TINY_RUN, "--detailed-captions", "1",
                 "--detail-digits", "3"]) == 2
    assert "--detail-digits must be 1 or 2, got 3" in capsys.readouterr().err
    partial = tmp_path / "partial"
    for name in ("unet", "text_encoder", "vae"):
        shutil.copytree(checkpoint_path() / name, partial / name)
    run[1] = str(partial)
    assert main(["toyworld", "train-base", str(tmp_path / "other"), *run]) == 2
    assert "has no model_index.json, tokenizer, scheduler" in capsys.readouterr().err


def test_atomic_folder_replaces_an_existing_folder_with_subfolders(tmp_path):
    """A rerun rewrites OUT/pipeline, whose components are folders: os.replace cannot put a folder over a
    non-empty one (the failure a resumed train-base hit), so each is swapped whole; files are replaced."""
    from vilex.outputs import atomic_folder

    out = tmp_path / "pipeline"
    with atomic_folder(out) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "old.bin").write_text("old")
        (staging / "model_index.json").write_text("1")
    with atomic_folder(out) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "new.bin").write_text("new")
        (staging / "model_index.json").write_text("2")
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["new.bin"]
    assert (out / "model_index.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no staging or retired folder left


def test_shifted_prompts_put_the_words_after_padding_and_leave_the_rest_as_the_prompt_builder_does():
    """`--shifted-captions`: a shifted caption's word embeddings follow BOS and 1 .. (as many as fit) padding
    embeddings, then EOS and padding to 77; with share 0 (and for the empty prompt) the rows are the prompt
    builder's own. Checked against the embedding table rows of the tokenizer's ids."""
    from vilex.bridge import PromptBuilder
    from vilex.toyworld import components
    from vilex.toyworld.config import BaseConfig
    from vilex.toyworld.train_base import shifted_prompts

    tokenizer = components.toy_tokenizer()
    table = components.toy_text_encoder(tokenizer).get_input_embeddings()
    builder = PromptBuilder(tokenizer, table)
    prompts = ["a small red square in the center on a blue plain background", "", "red"] * 8
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(shifted_prompts(builder, prompts, 0.0, generator), builder(None, prompts))
    rows = shifted_prompts(builder, prompts, 1.0, generator)
    W, pad = table.weight, table.weight[tokenizer.pad_token_id]
    shifts = set()
    for row, prompt in zip(rows, prompts):
        ids = tokenizer(prompt)["input_ids"]  # [BOS] words [EOS]
        if not prompt:
            assert torch.equal(row, builder(None, [""])[0])
            continue
        start = next(i for i in range(1, 77) if not torch.equal(row[i], pad))  # the first word
        shifts.add(start - 1)
        assert 1 <= start - 1 <= 75 - (len(ids) - 2)
        assert torch.equal(row[0], W[ids[0]]) and torch.equal(row[start:start + len(ids) - 1], W[ids[1:]])
        assert all(torch.equal(r, pad) for r in row[start + len(ids) - 1:])
    assert len(shifts) > 4  # the shift varies

    # A share below 1 shifts some captions and leaves the others where the prompt builder puts them.
    rows = shifted_prompts(builder, prompts[:1] * 64, 0.5, generator)
    unshifted = sum(torch.equal(row, builder(None, prompts[:1])[0]) for row in rows)
    assert 10 < unshifted < 54, unshifted

    # Added later: at 0 neither option is part of a run's identity, so runs made before them still resume.
    assert not {"partial_captions", "shifted_captions"} & BaseConfig(out="x").identity().keys()
    assert BaseConfig(out="x", shifted_captions=0.5).identity()["shifted_captions"] == 0.5


def test_vary_caption_draws_nothing_at_0_and_partial_captions_at_its_share():
    """`--partial-captions`: at 0 the caption itself and no random draw (a resumed older run keeps its numbers); at
    1 every caption a partial one (a subsequence of the caption's words), of many different subsets; at 0.5 both."""
    from vilex.toyworld.config import BaseConfig
    from vilex.toyworld.scenes import SPLITS, make_scenes
    from vilex.toyworld.train_base import vary_caption

    scene = make_scenes(1, SPLITS["heldout"])[0]
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert vary_caption(scene, BaseConfig(out="x"), generator) == scene.caption
    assert torch.equal(generator.get_state(), state)
    drawn = [vary_caption(scene, BaseConfig(out="x", partial_captions=1.0), generator) for _ in range(200)]
    def content(text):  # the words apart from articles ("a orange" is "an orange" in a partial caption)
        return [w for w in text.split() if w not in ("a", "an")]

    for caption in drawn:
        full = iter(content(scene.caption))
        assert caption and all(w in full for w in content(caption)), caption
    assert len(set(drawn)) > 15 and drawn.count(scene.caption) < 20
    half = [vary_caption(scene, BaseConfig(out="x", partial_captions=0.5), generator) for _ in range(200)]
    assert 70 < half.count(scene.caption) < 140

    # --detailed-captions: a share of the whole captions start with the object's place and size; partial ones never.
    def is_detailed(caption):
        return caption.startswith("x ") and caption.endswith(" " + scene.caption)

    half = [vary_caption(scene, BaseConfig(out="x", detailed_captions=0.5), generator) for _ in range(200)]
    assert set(half) == {scene.caption, half[[is_detailed(c) for c in half].index(True)]}
    assert 70 < sum(map(is_detailed, half)) < 130
    both = [vary_caption(scene, BaseConfig(out="x", partial_captions=0.5, detailed_captions=1.0), generator)
            for _ in range(200)]
    assert all(is_detailed(c) or not c.startswith("x ") for c in both)
    assert 70 < sum(map(is_detailed, both)) < 130
    # --detail-digits 2: the detailed captions carry two digits per coordinate ("x 3 4 y 7 1 r 4 ...").
    two = [vary_caption(scene, BaseConfig(out="x", detailed_captions=1.0, detail_digits=2), generator) for _ in range(5)]
    assert all(is_detailed(c) and len(c.split()) == len(scene.caption.split()) + 8 for c in two)
