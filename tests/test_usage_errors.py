"""What a new user trips over (issue 19), each case as they type it: one line, exit code 2, naming the flag or
file they typed and the allowed values; the same line whichever backend runs the command; checked before the
model loads wherever the model is not needed. Served cases use the session's server (tests/conftest.py)."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vilex.cli import build_parser, main
from vilex.errors import ImageInputError, ViLexUsageError

ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # vilex's limit, as docs/cli.md states it (8192 x 8192)


def one_error(capsys, *args) -> str:
    """Run `vilex ARGS`; it must fail with exit code 2 and one line on stderr, whose message is returned."""
    capsys.readouterr()  # what earlier commands wrote (a progress bar) is not this one's
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, code, err)
    prefix = f"vilex {args[0]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Any attempt to open a pipeline fails the test: what is checked must be checked before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command opened a pipeline before checking its arguments")

    monkeypatch.setattr("vilex.runtime.open_pipeline", refuse)
    monkeypatch.setattr("vilex.presets.from_local", refuse)
    monkeypatch.setattr("vilex.presets.build_preset", refuse)
    monkeypatch.setattr("vilex.pipeline.ViLexPipeline.from_pretrained", refuse)


# ---- 14: options between image arguments --------------------------------------------------------------------------------
def test_options_may_come_between_images(tiny_ckpt, sample_files, tmp_path):
    from vilex.outputs import load_tokens

    args = build_parser().parse_args(["reconstruct", "ck", "a.png", "--tokens", "4", "b.png", "--out", "o", "c.png"])
    assert (args.ckpt, args.images, args.tokens, args.out) == ("ck", ["a.png", "b.png", "c.png"], 4, "o")
    out = tmp_path / "t.safetensors"
    assert main(["tokenize", str(tiny_ckpt), str(sample_files[0]), "--tokens", "2", str(sample_files[1]),
                 "--out", str(out)]) == 0
    assert tuple(load_tokens(out).shape) == (2, 2, 32)
    # A command with subcommands of its own parses as before (argparse cannot intermix those).
    assert build_parser().parse_args(["toyworld", "make-data", "d", "--n", "3"]).n == 3


# ---- 21 (and 17): arguments checked before the model loads -----------------------------------------------------------
def test_arguments_are_checked_before_anything_loads(nothing_loads, tiny_ckpt, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    served = ["--backend", "triton", "--url", "127.0.0.1:1"]  # no server there: nothing may be sent either
    assert one_error(capsys, "reconstruct", tiny_ckpt, tmp_path / "missing.png", "--out", out) == \
        f"IMAGE '{tmp_path / 'missing.png'}': no such file"
    # --tokens 0: the same line locally and served (1..75, the most tokens any checkpoint has).
    for backend in ([tiny_ckpt], served):
        assert one_error(capsys, "reconstruct", *backend, image_file, "--out", out, "--tokens", 0) == \
            "--tokens must be in 1..75, got 0"
        assert one_error(capsys, "tokenize", *backend, image_file, "--out", tmp_path / "t.safetensors",
                         "--tokens", 76) == "--tokens must be in 1..75, got 76"
        # The flag typed, not the library's text_guidance_scale.
        assert one_error(capsys, "reconstruct", *backend, image_file, "--out", out, "--text-guidance", 2) \
            .startswith("--text-guidance needs --prompt")
    assert one_error(capsys, "reconstruct", tiny_ckpt, image_file, "--out", out, "--height", 0) == \
        "--height must be in 1..4096, got 0"
    assert one_error(capsys, "tokenize", tiny_ckpt, image_file, "--out", tmp_path / "t.npy") == \
        f"--out '{tmp_path / 't.npy'}' must end in .safetensors"
    # init names --num-queries, not the model's num_queries, before the folders load; a preset would ignore it.
    assert one_error(capsys, "init", tmp_path / "ck", "--base", tmp_path, "--vision", tmp_path,
                     "--num-queries", 0) == "--num-queries must be in 1..75, got 0"
    assert one_error(capsys, "init", tmp_path / "ck", "--preset", "tiny", "--num-queries", 20) == \
        "--num-queries is for --base/--vision; a --preset has its own token count"
    # new-vilex's pretraining options need the pretraining they shape.
    assert one_error(capsys, "toyworld", "new-vilex", tiny_ckpt, tmp_path / "nv", "--pretrain-captioning", 1) == \
        "--pretrain-all-swaps and --pretrain-captioning need --pretrain-vision STEPS > 0"
    assert one_error(capsys, "toyworld", "new-vilex", tiny_ckpt, tmp_path / "nv", "--pretrain-vision", 5,
                     "--pretrain-captioning", -1) == "--pretrain-captioning must be in 0..100, got -1.0"
    assert one_error(capsys, "toyworld", "tune-vision", tiny_ckpt, tmp_path / "nv", "--device", "tpu") == \
        "--device must be cpu, cuda or cuda:N, got 'tpu'"
    assert one_error(capsys, "toyworld", "tune-vision", tiny_ckpt, tmp_path / "nv", "--steps", 0) == \
        "--steps must be in 1..1000000, got 0"
    (tmp_path / "taken").mkdir()
    assert one_error(capsys, "init", tmp_path / "taken", "--preset", "tiny") == \
        f"OUT '{tmp_path / 'taken'}' already exists; choose a new folder"
    # refused before the scenes are rendered or a step trained
    assert one_error(capsys, "toyworld", "tune-vision", tiny_ckpt, tmp_path / "taken") == \
        f"OUT '{tmp_path / 'taken'}' already exists; choose a new folder"
    assert one_error(capsys, "toyworld", "new-vilex", tiny_ckpt, tmp_path / "taken", "--pretrain-vision", 5) == \
        f"OUT '{tmp_path / 'taken'}' already exists; choose a new folder"
    assert not out.exists() and not (tmp_path / "ck").exists() and not (tmp_path / "nv").exists()


def test_tune_vision_refuses_a_checkpoint_outside_the_toy_world(tiny_ckpt, tmp_path, capsys):
    """The tiny preset's vision model takes 32x32 images: named before any scene is rendered or step trained."""
    assert one_error(capsys, "toyworld", "tune-vision", tiny_ckpt, tmp_path / "tuned") == \
        f"CKPT '{tiny_ckpt}' is not a toy-world checkpoint: its vision model takes 32x32 images, the toy world's " \
        "scenes are 64x64"
    assert not (tmp_path / "tuned").exists()


# ---- 20: tokenize --out -------------------------------------------------------------------------------------------------
def test_tokenize_refuses_an_existing_out_and_writes_a_plain_file(tiny_ckpt, image_file, tmp_path, capsys):
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"kept")
    assert one_error(capsys, "tokenize", tiny_ckpt, image_file, "--out", existing) == \
        f"--out '{existing}' already exists; choose a new file"
    assert existing.read_bytes() == b"kept"
    new = tmp_path / "new.safetensors"
    assert main(["tokenize", str(tiny_ckpt), str(image_file), "--out", str(new)]) == 0
    reference = tmp_path / "reference.txt"  # a file as open() makes one under this process's umask
    reference.write_text("")
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


# ---- 9: a prompt beside all the tokens ---------------------------------------------------------------------------------
PROMPT = "a small red house under a blue sky"


def largest_tokens_beside(tiny_ckpt, prompt: str) -> tuple[int, int]:
    """(text tokens of `prompt`, the most ViLex tokens beside it), from the checkpoint's tokenizer: its 77
    positions less BOS and EOS, less the prompt's tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt / "tokenizer")
    n_text = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return n_text, tokenizer.model_max_length - 2 - n_text


def test_a_prompt_beside_all_tokens_names_the_largest_tokens_that_fit(tiny_ckpt, image_file, tmp_path, capsys):
    n_text, largest = largest_tokens_beside(tiny_ckpt, PROMPT)
    command = ["reconstruct", tiny_ckpt, image_file, "--prompt", PROMPT, "--steps", 1, "--out", tmp_path / "out"]
    message = one_error(capsys, *command)  # the default --tokens: all 75
    assert message.startswith(f"--prompt: prompt is too long: {n_text} text tokens, but with 75 ViLex tokens "
                              f"at most 0 text tokens fit"), message
    assert message.endswith(f"(--tokens <= {largest})"), message
    assert one_error(capsys, *command, "--tokens", largest + 1).endswith(f"(--tokens <= {largest})")
    assert main([str(a) for a in [*command, "--tokens", largest]]) == 0  # the K it names fits
    assert (tmp_path / "out" / f"{image_file.stem}.png").is_file()
    # generate: the tokens come from a file, so the way to fewer is `vilex tokenize --tokens`.
    tokens = tmp_path / "t.safetensors"
    assert main(["tokenize", str(tiny_ckpt), str(image_file), "--out", str(tokens)]) == 0
    assert one_error(capsys, "generate", tiny_ckpt, "--tokens", tokens, "--prompt", PROMPT, "--out",
                     tmp_path / "gen").endswith(f"(make the tokens with `vilex tokenize --tokens {largest}`)")


# ---- 15: oversized images -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [9000, 10000, 16383])  # above ours; above Pillow's warning; above Pillow's error
def test_an_oversized_image_gets_one_message_at_any_size(side, tmp_path, recwarn):
    from vilex.benchmarks.hostile_images import webp_bomb
    from vilex.images import decode_image, load_image

    path = tmp_path / "big.webp"
    path.write_bytes(webp_bomb(side, side))  # 38 bytes whose header says side x side
    # Pillow refuses to open above twice its own limit: the size is not known then.
    size = f"{side}x{side}" if side * side <= 2 * Image.MAX_IMAGE_PIXELS else f"more than {2 * Image.MAX_IMAGE_PIXELS}"
    with pytest.raises(ImageInputError) as raised:
        load_image(path)
    assert str(raised.value) == f"IMAGE '{path}': {size} pixels is above the limit of {MAX_IMAGE_PIXELS} pixels"
    with pytest.raises(ImageInputError) as raised:
        decode_image(path.read_bytes(), name="IMAGE[0]")
    assert str(raised.value) == f"IMAGE[0]: {size} pixels is above the limit of {MAX_IMAGE_PIXELS} pixels"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_issues_bomb_through_the_command_line(nothing_loads, tiny_ckpt, tmp_path, capsys):
    from vilex.benchmarks.hostile_images import png_bomb

    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(20000))  # 20000 x 20000: Pillow's "decompression bomb" before the fix
    assert one_error(capsys, "tokenize", tiny_ckpt, path, "--out", tmp_path / "t.safetensors") == \
        f"IMAGE '{path}': more than {2 * Image.MAX_IMAGE_PIXELS} pixels is above the limit of {MAX_IMAGE_PIXELS} pixels"


# ---- 18: one source of limits -------------------------------------------------------------------------------------------
def test_in_process_onnxruntime_keeps_the_exports_size_bounds(in_process, tiny_engines):
    """Before: in-process onnxruntime made images of any size from an export the server bounds."""
    from vilex.engines.folder import EngineFolder

    options = EngineFolder.open(tiny_engines).options  # the export's own record of its bounds
    tokens = torch.zeros(1, 4, 32)
    for side, value in (("height", 2 * options.max_size), ("width", options.min_size // 2)):
        with pytest.raises(ViLexUsageError, match=rf"^{side} must be in {options.min_size}\.\.{options.max_size}, "
                                                  rf"got {value}$"):
            in_process.generate(tokens, num_inference_steps=1, progress=False, **{side: value})


def test_help_says_the_limits_where_the_flags_are_described(capsys, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vilex.serving.config import DEFAULT_MAX_STEPS

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: argparse wraps at hyphens too
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--steps STEPS denoising steps, 1..1000 (default 25); a server takes at most its repository's " \
           f"--max-steps (default {DEFAULT_MAX_STEPS})" in text
    # 16: the multiple, in words, with the toy checkpoint's figure taken from its shipped configs.
    weights = ROOT / "vilex" / "toyworld" / "weights" / "pipeline"
    vae, unet = (AutoencoderKL.load_config(weights / "vae"), UNet2DConditionModel.load_config(weights / "unet"))
    toy = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
    assert re.search(rf"--height HEIGHT output height in pixels .* a multiple of the checkpoint's pixel step, "
                     rf"which is the VAE's down-scaling times the UNet's \({toy} for the toy checkpoint", text), text


# ---- served: the same lines, and no library internals ------------------------------------------------------------------
@pytest.mark.triton
def test_every_backend_prints_the_same_line(served, tiny_ckpt, image_file, tmp_path, capsys):
    """The same mistake through torch, onnxruntime and the server: one line, the flags typed (the server names
    HEIGHT[0], NUM_TOKENS[0]); the bounds are the export's own record and the repository's max_steps."""
    from vilex.engines.folder import EngineFolder

    backends = {"torch": [tiny_ckpt], "onnxruntime": ["--backend", "onnxruntime", "--engines", served.engines],
                "triton": ["--backend", "triton", "--url", served.http]}

    def line(backend: str, *flags) -> str:
        return one_error(capsys, "reconstruct", *backends[backend], image_file, "--out", tmp_path / "out",
                         "--steps", 1, *flags)

    _, largest = largest_tokens_beside(tiny_ckpt, PROMPT)
    prompt = {name: line(name, "--prompt", PROMPT) for name in backends}
    assert prompt["torch"] == prompt["onnxruntime"] == prompt["triton"], prompt
    assert prompt["triton"].startswith("--prompt: prompt is too long") and f"(--tokens <= {largest})" in prompt["triton"]

    folder = EngineFolder.open(served.engines)  # the export's own record of its sizes and bounds
    options, multiple = folder.options, folder.dims.pixel_multiple
    odd = options.min_size + multiple // 2
    for flags, expected in (
            (("--height", odd), f"--height must be a positive multiple of {multiple} in "
                                f"{options.min_size}..{options.max_size}, got {odd}"),
            (("--width", 2 * options.max_size), f"--width must be in {options.min_size}..{options.max_size}, "
                                                 f"got {2 * options.max_size}")):
        assert line("onnxruntime", *flags) == line("triton", *flags) == expected

    config = (served.repository / "vilex_reconstruct" / "config.pbtxt").read_text()
    max_steps = int(re.search(r'key: "max_steps"\s*value \{\s*string_value: "(\d+)"', config).group(1))
    assert line("triton", "--steps", max_steps + 1) == f"--steps must be in 1..{max_steps}, got {max_steps + 1}"
    assert not (tmp_path / "out").exists()


@pytest.mark.triton
def test_served_image_errors_say_nothing_of_our_internals(served, sample_files):
    from vilex.benchmarks.hostile_images import png_bomb
    from vilex.serving.client import ServedRequestError, TritonClient

    with TritonClient(served.http) as client:
        with pytest.raises(ServedRequestError) as raised:
            client.tokenize([b"\x89PNG not really"])
        message = str(raised.value)
        assert message.startswith("IMAGE[0]: bytes are not a readable image") and not re.search(r"BytesIO|0x[0-9a-f]", message)
        with pytest.raises(ServedRequestError) as raised:
            client.tokenize([png_bomb(20000)])
        assert str(raised.value) == \
            f"IMAGE[0]: more than {2 * Image.MAX_IMAGE_PIXELS} pixels is above the limit of {MAX_IMAGE_PIXELS} pixels"


# ---- 5: the wrong protocol for a port -----------------------------------------------------------------------------------
@pytest.mark.triton
def test_the_wrong_protocol_for_a_port_is_a_usage_error(served, image_file, tmp_path, capsys):
    """Before: HTTP to the gRPC port ended in a traceback (geventhttpclient's HTTPParseError)."""
    def tokenize(url: str, protocol: str) -> str:
        return one_error(capsys, "tokenize", image_file, "--out", tmp_path / "t.safetensors", "--backend", "triton",
                         "--url", url, "--protocol", protocol)

    http_at_grpc = tokenize(served.grpc, "http")
    assert http_at_grpc.startswith(f"--url {served.grpc}: no tritonserver answers over http") and \
        http_at_grpc.endswith("a gRPC port needs --protocol grpc"), http_at_grpc
    grpc_at_http = tokenize(served.http, "grpc")
    assert grpc_at_http.startswith(f"--url {served.http}: no tritonserver answers over grpc") and \
        grpc_at_http.endswith("if it is an HTTP port, use --protocol http"), grpc_at_http
    # Where nothing listens, no such guess.
    from vilex.serving.server import free_ports

    assert "--protocol http" not in tokenize(f"127.0.0.1:{free_ports(1)[0]}", "grpc")


# ---- 19: the documented client -----------------------------------------------------------------------------------------
@pytest.mark.triton
def test_the_documented_python_client_runs(served, sample_files, tmp_path, monkeypatch):
    """docs/serving.md's Python example, as written, against the tests' server (its host names replaced). It asks
    for no size: the sizes an export takes depend on its checkpoint (before: height=48, width=64, which only
    `tiny` and the toy checkpoint take), and the text after it says which."""
    text = (ROOT / "docs" / "serving.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'TritonClient("localhost:8000")' in b]
    assert not re.search(r"\b(height|width)=", block), block
    shutil.copyfile(sample_files[0], tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace("localhost:8000", served.http), "docs/serving.md", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 16, 32)
    images = namespace["images"]
    assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)  # the tiny export's native size


def test_a_missing_shipped_checkpoint_is_named_not_called_an_invalid_value(nothing_loads, image_file, tmp_path,
                                                                            capsys, monkeypatch):
    """CKPT 'toy' on an installation without the shipped weights: argparse's own error names the missing folder
    and what to do, for a command of each parser (the main one, eval's, train's, export's, bench's)."""
    monkeypatch.setattr("vilex.toyworld.shipped.WEIGHTS", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "weights" / "pipeline"
    for args in (["reconstruct", "toy", image_file, "--out", "o.png"], ["eval", "toy"],
                 ["train", "toy", "--data", tmp_path, "--out", "run"], ["export", "toy", "--out", "engines"],
                 ["bench", "toy", "--out", "bench"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as raised:  # argparse's own exit
            main([str(a) for a in args])
        assert raised.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after argparse's usage lines
            f"vilex {args[0]}: error: argument CKPT: the toy world's pipeline weights are not in this installation "
            f"({missing}); reinstall vilex, or train them: see vilex/toyworld/weights/MODEL_CARD.md"), args
