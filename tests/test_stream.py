"""Progress streaming: the decoupled models `vilex_generate_stream` and `vilex_reconstruct_stream`, over gRPC.

One real tritonserver for the module, on a repository written by `vilex triton-repo` from the session's tiny
export, holding only the models these tests call: the four graph models, `vilex_generate` (the non-streamed
reference) and the two streaming models. `vilex_generate_stream` comes from a `--unet bls` repository and
`vilex_reconstruct_stream` from a `--unet local` one, so both UNet placements run in this one server.

The first test is in-process: the pipeline loop's step callback, which the streaming models use.

What is checked against something independent of the streaming code: the streamed images against the
in-process onnxruntime pipeline and the non-streamed served model; the number of progress events against
the steps asked for; cancellation against the server's own statistics (the `unet` and `vae_decoder` models'
execution counts) and the step the model logs.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import PIL.Image
import pytest
import torch

from vilex.errors import ViLexUsageError

STEPS = 3  # denoising steps where the test does not need more: cheap on 2 cores
MANY_STEPS = 200  # the served limit (max_steps): a request that would run long, to cancel
PIXEL_TOLERANCE = 1  # of 255, as tests/test_serving.py (the same graphs on the same inputs; 0 is what is seen)
STATS_WAIT_S = 120.0  # how long to wait for the server to record an execution (a failure bound, not a measurement)

@pytest.fixture(scope="module")
def stream_server(tiny_engines, tmp_path_factory):
    """tritonserver on the models this module calls (see the module docstring)."""
    from vilex.serving.repository import build_repository
    from vilex.serving.server import Ports, TritonServer

    root = tmp_path_factory.mktemp("stream")
    repository = build_repository(tiny_engines, root / "repository", unet="bls", streaming=True)
    local = build_repository(tiny_engines, root / "local", unet="local", streaming=True)
    # vilex_reconstruct_stream as `--unet local` writes it (its config says unet "local"; its engine/ has the UNet).
    shutil.rmtree(repository / "vilex_reconstruct_stream")
    shutil.copytree(local / "vilex_reconstruct_stream", repository / "vilex_reconstruct_stream")
    # Fewer models load faster: drop the two this module does not call (and from repository.json's list).
    info = json.loads((repository / "repository.json").read_text())
    for name in ("vilex_tokenize", "vilex_reconstruct"):
        shutil.rmtree(repository / name)
        info["models"]["pipeline"].remove(name)
    (repository / "repository.json").write_text(json.dumps(info))
    server = TritonServer(repository, ports=Ports.free(), log=root / "server.log", watchdog=False)
    server.start(timeout_s=900)  # seven models load at once; on 2 busy cores that has taken minutes
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokens(in_process, sample_files):
    """ViLex tokens (2, 8, D) of two sample images, made in-process."""
    from vilex.images import load_image

    return in_process.tokenize([load_image(p) for p in sample_files[:2]], num_tokens=8)


def grpc_client(stream_server):
    from vilex.serving.client import TritonClient

    return TritonClient(stream_server.url("grpc"), "grpc")


def executions(stream_server, model: str) -> int:
    from vilex.serving.client import TritonClient

    with TritonClient(stream_server.url("http")) as client:
        return client.statistics(model)["executions"]


def max_pixel_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---- in-process: the loop's step callback, which the streaming models use --------------------------------------
def test_step_callback_sees_every_step_and_can_stop_the_loop(tiny_pipeline):
    """callback_on_step_end (the diffusers convention) is called once per step, in order, with the latents; a
    callback that returns them unchanged leaves the image as it is, and one that raises stops the loop before
    the decode (the VAE decoder stage never runs)."""
    calls = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        calls.append((step_index, int(timestep), tuple(callback_kwargs["latents"].shape)))
        return callback_kwargs

    tokens = torch.randn(1, 4, tiny_pipeline.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=2, output_type="np").images
    seen = tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=2, output_type="np",
                                  callback_on_step_end=record).images
    assert [c[0] for c in calls] == list(range(STEPS))
    assert [c[1] for c in calls] == [int(t) for t in tiny_pipeline.scheduler.timesteps]
    assert np.array_equal(plain, seen)

    class Stop(Exception):
        pass

    stages = []
    stage_backend = tiny_pipeline.backend
    original = stage_backend.run
    stage_backend.run = lambda stage, inputs: stages.append(stage) or original(stage, inputs)

    def stop(pipeline, step_index, timestep, callback_kwargs):
        raise Stop(step_index)

    with pytest.raises(Stop):
        tiny_pipeline.generate(tokens, num_inference_steps=STEPS, seed=2, callback_on_step_end=stop)
    assert stages.count("unet") == 1 and "vae_decoder" not in stages


# ---- progress and the result ----------------------------------------------------------------------------------
@pytest.mark.triton
def test_generate_stream_sends_each_step_then_the_served_image(stream_server, in_process, tokens):
    """Two images in one request, 4 steps, a preview every 2: progress 1, 2, 3, 4 of 4 (previews at 2 and 4),
    then images equal to the non-streamed stream_server ones and the in-process ones."""
    options = dict(prompt="a red circle", steps=4, seed=3)
    with grpc_client(stream_server) as client:
        events = list(client.generate_stream(tokens.numpy(), preview_every=2, **options))
        served_images = client.generate(tokens.numpy(), **options)
    progress, result = events[:-1], events[-1]
    assert [(e.step, e.total_steps) for e in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [e.preview is not None for e in progress] == [False, True, False, True]
    assert all(e.images is None for e in progress) and result.images is not None
    assert result.images.shape == (2, 64, 64, 3) and progress[1].preview.shape == (2, 64, 64, 3)
    # The server draws each image's noise from its own generator: the reference is each image generated alone.
    expected = [np.asarray(in_process.generate(tokens[row:row + 1], prompt="a red circle", num_inference_steps=4,
                                               seed=3).images[0]) for row in range(2)]
    for row in range(2):
        assert max_pixel_difference(result.images[row], served_images[row]) == 0, row
        assert max_pixel_difference(result.images[row], expected[row]) <= PIXEL_TOLERANCE, row
        # The preview after the last step is the decoded final latents: the image itself.
        assert max_pixel_difference(progress[-1].preview[row], result.images[row]) <= PIXEL_TOLERANCE, row
    # An earlier preview is a real intermediate, not the result sent early.
    assert max_pixel_difference(progress[1].preview[0], result.images[0]) > PIXEL_TOLERANCE


@pytest.mark.triton
def test_reconstruct_stream_with_the_local_unet_equals_in_process(stream_server, in_process, sample_files):
    """`--unet local`: progress per step, the in-process image, and no request reached the `unet` model."""
    from vilex.images import load_image

    unet_before = executions(stream_server, "unet")
    with grpc_client(stream_server) as client:
        events = list(client.reconstruct_stream([sample_files[1].read_bytes()], num_tokens=16, steps=STEPS, seed=4))
    assert [(e.step, e.total_steps) for e in events[:-1]] == [(s, STEPS) for s in range(1, STEPS + 1)]
    assert all(e.preview is None for e in events)  # none asked for
    expected = np.asarray(in_process([load_image(sample_files[1])], num_tokens=16, num_inference_steps=STEPS,
                                     seed=4).images[0])
    assert max_pixel_difference(events[-1].images[0], expected) <= PIXEL_TOLERANCE
    assert executions(stream_server, "unet") == unet_before


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("values, message", [
    (dict(PREVIEW_EVERY=np.array([[0]], np.int32)), "PREVIEW_EVERY[0] must be in 1..200, got 0"),
    (dict(PREVIEW_EVERY=np.array([[201]], np.int32)), "PREVIEW_EVERY[0] must be in 1..200, got 201"),
    (dict(PREVIEW_EVERY=np.array([[1], [2]], np.int32)), "PREVIEW_EVERY must be the same for every image"),
    (dict(STEPS=np.array([[0]], np.int32)), "STEPS[0] must be in 1..200, got 0"),
    (dict(ORDER=np.array([[b"sideways"]], object)), "ORDER[0] must be one of vilex_first, text_first"),
])
def test_bad_stream_input_is_an_error_naming_it(stream_server, tokens, values, message):
    from vilex.serving.client import ServedRequestError

    n = len(next(iter(values.values())))
    inputs = {"VILEX_TOKENS": tokens.numpy()[:n], **values}
    with grpc_client(stream_server) as client:
        with pytest.raises(ServedRequestError, match=re.escape(message)) as error:
            list(client.stream("vilex_generate_stream", inputs))
        assert error.value.status == "INVALID_ARG"  # the model's code for a caller's mistake
        # The same client streams the next request as usual.
        assert list(client.generate_stream(tokens.numpy()[:1], steps=1))[-1].images.shape == (1, 64, 64, 3)


@pytest.mark.triton
def test_a_wrong_dtype_is_tritons_error_naming_the_input(stream_server, tokens):
    """Triton checks dtypes before the model runs; on a stream its error comes without a status code, so it is a
    ServingError (not a ServedRequestError), with Triton's message naming the input. (The client's own calls
    send every input in its declared dtype.)"""
    from vilex.serving.client import ServingError

    with grpc_client(stream_server) as client:
        with pytest.raises(ServingError, match=re.escape("inference input 'PREVIEW_EVERY' data-type is 'FP32', but "
                                                         "model 'vilex_generate_stream' expects 'INT32'")):
            list(client.stream("vilex_generate_stream", {"VILEX_TOKENS": tokens.numpy()[:1],
                                                         "PREVIEW_EVERY": np.array([[1.0]], np.float32)}))


@pytest.mark.triton
def test_streaming_needs_grpc_and_checks_like_the_plain_call(stream_server, tokens):
    from vilex.serving.client import TritonClient
    from vilex.serving.remote import RemotePipeline

    with TritonClient(stream_server.url("http")) as client:
        with pytest.raises(ViLexUsageError, match="streaming needs --protocol grpc.*got --protocol http"):
            client.generate_stream(tokens.numpy(), steps=STEPS)  # refused when called, before anything is sent
    with pytest.raises(ViLexUsageError, match="--stream needs --protocol grpc.*got --protocol http"):
        RemotePipeline(stream_server.url("http"), "http").streaming()
    remote = RemotePipeline(stream_server.url("grpc"), "grpc").streaming()
    for bad, pattern in ((dict(num_inference_steps=0), "steps"), (dict(guidance_scale=float("nan")), "guidance"),
                         (dict(order="sideways"), "order")):
        with pytest.raises(ViLexUsageError, match=pattern):
            remote.generate(tokens[:1], progress=False, **bad)
    # What only the server knows comes back named by the server, as without streaming.
    with pytest.raises(ViLexUsageError, match=re.escape("HEIGHT[0] must be a positive multiple of 4 in 32..128")):
        remote.generate(tokens[:1], num_inference_steps=1, height=50, progress=False)


# ---- cancellation -------------------------------------------------------------------------------------------------
def wait_for_executions(stream_server, model: str, count: int) -> int:
    """Wait until the server has recorded `count` executions of `model` (it does when execute() returns)."""
    deadline = time.monotonic() + STATS_WAIT_S
    while (seen := executions(stream_server, model)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{model} recorded {seen} executions, expected {count}, within {STATS_WAIT_S:g} s:\n"
                        f"{stream_server.log_tail()}")
        time.sleep(0.2)
    return seen


@pytest.mark.triton
@pytest.mark.parametrize("model", ["vilex_generate_stream", "vilex_reconstruct_stream"])
def test_leaving_the_stream_early_stops_the_servers_work(stream_server, tokens, sample_files, model):
    """Leave a 200-step stream after 2 steps: the client closes the gRPC stream with cancel_requests=True, and the server's statistics show the loop stopped there (bls: the `unet` model
    ran the steps the model logs, far from 200) and nothing was decoded (`vae_decoder` did not run)."""
    names = ("unet", "vae_decoder", model)
    before = {name: executions(stream_server, name) for name in names}
    log_start = len(stream_server.log_text())
    with grpc_client(stream_server) as client:
        if model == "vilex_generate_stream":
            stream = client.generate_stream(tokens.numpy()[:1], steps=MANY_STEPS, seed=1)
        else:
            stream = client.reconstruct_stream([sample_files[0].read_bytes()], steps=MANY_STEPS, seed=1)
        with stream as events:
            for event in events:
                assert event.images is None and event.total_steps == MANY_STEPS
                if event.step == 2:
                    break  # leaving the with block closes the stream, which cancels the request
    wait_for_executions(stream_server, model, before[model] + 1)  # its execute() has returned
    stopped = re.search(rf"{model}: request cancelled, stopped after (\d+) of {MANY_STEPS} denoising steps",
                        stream_server.log_text()[log_start:])
    assert stopped, stream_server.log_tail()
    steps_run = int(stopped.group(1))
    assert 2 <= steps_run < MANY_STEPS
    after = {name: executions(stream_server, name) for name in names}
    assert after["vae_decoder"] == before["vae_decoder"]  # stopped before the decode
    # The unet model ran exactly the steps the model reports (bls), or none (local: the UNet is in-process).
    assert after["unet"] - before["unet"] == (steps_run if model == "vilex_generate_stream" else 0)
    with grpc_client(stream_server) as client:  # and the model serves the next request
        assert list(client.generate_stream(tokens.numpy()[:1], steps=1))[-1].images is not None


# ---- the command line ---------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_cli_stream_shows_progress_and_writes_the_same_pngs(stream_server, in_process, tokens, sample_files, tmp_path,
                                                             capsys):
    from vilex.cli import main
    from vilex.images import load_image
    from vilex.outputs import save_tokens

    token_file = save_tokens(tmp_path / "tokens.safetensors", tokens, {"images": ["a", "b"]})
    grpc = ["--backend", "triton", "--url", stream_server.url("grpc"), "--protocol", "grpc", "--steps", str(STEPS),
            "--seed", "5"]
    capsys.readouterr()
    assert main(["generate", "--tokens", str(token_file), "--out", str(tmp_path / "streamed"), *grpc, "--stream"]) == 0
    assert f"{2 * STEPS}/{2 * STEPS}" in capsys.readouterr().err  # one bar over both images' steps
    assert main(["generate", "--tokens", str(token_file), "--out", str(tmp_path / "plain"), *grpc]) == 0
    for name in ("000.png", "001.png"):
        streamed = np.asarray(PIL.Image.open(tmp_path / "streamed" / name))
        assert max_pixel_difference(streamed, np.asarray(PIL.Image.open(tmp_path / "plain" / name))) == 0, name

    image = sample_files[1]
    assert main(["reconstruct", str(image), "--out", str(tmp_path / "rec"), "--tokens", "16", *grpc, "--stream"]) == 0
    written = np.asarray(PIL.Image.open(tmp_path / "rec" / f"{image.stem}.png"))
    expected = np.asarray(in_process([load_image(image)], num_tokens=16, num_inference_steps=STEPS, seed=5).images[0])
    assert max_pixel_difference(written, expected) <= PIXEL_TOLERANCE

    # --stream is for a server over gRPC: one line naming the flag to change, exit code 2, nothing written.
    capsys.readouterr()
    http = ["--backend", "triton", "--url", stream_server.url("http"), "--steps", str(STEPS)]
    assert main(["reconstruct", str(image), "--out", str(tmp_path / "x"), *http, "--stream"]) == 2
    assert "--stream needs --protocol grpc" in capsys.readouterr().err
    assert main(["generate", "--tokens", str(token_file), "--out", str(tmp_path / "x"), "--engines", "e",
                 "--backend", "onnxruntime", "--stream"]) == 2
    assert "--stream needs --backend triton" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.triton
def test_a_server_without_streaming_models_names_the_flag(served, tokens):
    """The session's server (conftest.py) is a repository written without --stream: asking it for a stream is a
    usage error that says how to write one that has them, before anything is sent."""
    from vilex.serving.client import TritonClient

    with TritonClient(served.grpc, "grpc") as client:
        with pytest.raises(ViLexUsageError, match=r"no vilex_generate_stream model; .*vilex triton-repo .*--stream"):
            client.generate_stream(tokens, steps=STEPS)
        assert client.generate(tokens, steps=STEPS, seed=0).shape == (2, 64, 64, 3)  # the plain models serve
