"""`vilex stress` and the image-decoding hardening it led to.

CPU tests: the hostile images are what they claim (the WebP bomb really decodes to any size; every
truncated or corrupt image is refused by the server's own decoding code), images.py refuses animations,
NaN pixels and decoder crashes with a message naming the image, and the case list covers what the issue
asks for.

Server test (marked `triton`): the tiny checkpoint exported, served by `vilex serve` on free ports, and
`vilex stress` run against it as a command, CI-sized (--quick, 24 soak requests, overload at 4 steps);
results.json is checked part by part.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from vilex.benchmarks import hostile_images as images
from vilex.benchmarks.hostile import BATCHED_CASES, FRONTEND, REJECT, SERVE, Served, all_cases
from vilex.errors import ImageInputError, ViLexUsageError
from vilex.images import decode_image, load_image

TINY_INPUTS = {  # the pipeline models' inputs as the metadata API lists them for the tiny export
    "vilex_tokenize": {"IMAGE": "BYTES", "IMAGE_RGB": "UINT8", "NUM_TOKENS": "INT32"},
    "vilex_generate": {"VILEX_TOKENS": "FP32", "NUM_TOKENS": "INT32", "PROMPT": "BYTES", "STEPS": "INT32",
                       "GUIDANCE": "FP32", "SEED": "INT64"},
    "vilex_reconstruct": {"IMAGE": "BYTES", "IMAGE_RGB": "UINT8", "NUM_TOKENS": "INT32", "PROMPT": "BYTES",
                          "STEPS": "INT32", "GUIDANCE": "FP32", "SEED": "INT64"},
}
TINY = Served(hidden_size=32, num_queries=75, max_batch=4, max_steps=200, inputs=TINY_INPUTS)


# ---- the hostile images are real -------------------------------------------------------------------------------
def test_webp_bomb_is_a_real_bomb():
    """38 bytes whose patched header really decodes, one color, at the size it claims (checked small)."""
    data = images.webp_bomb(3000, 2000)
    assert len(data) < 64
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        pixels = np.asarray(image)
    assert pixels.shape == (2000, 3000, 3) and (pixels == pixels[0, 0]).all()


def test_png_bomb_is_a_valid_png():
    data = images.png_bomb(3000)  # 9 M pixels from about 1 KB
    assert len(data) < 4096
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (3000, 3000) and image.mode == "1"


@pytest.mark.parametrize("case", [c for c in all_cases(TINY) if c.expect == REJECT and "IMAGE" in (c.inputs or {})
                                  and re.match(r"IMAGE\\\[\d\\\]", c.names)], ids=lambda c: c.name)
def test_every_hostile_image_is_refused_by_the_servers_decoding(case):
    """The server's own check (header, then decode_image) refuses each one with a message naming the row."""
    from vilex.serving.pipeline_requests import decode_encoded

    for row, data in enumerate(case.inputs["IMAGE"][:, 0]):
        try:
            decode_encoded(data, f"IMAGE[{row}]", TINY.max_image_pixels)
        except ViLexUsageError as error:  # regression: a damaged AVIF raised RuntimeError here (a 500)
            assert re.search(case.names, str(error)), str(error)
            return
    pytest.fail(f"{case.name}: decoded without an error")


def test_generate_without_vilex_tokens_is_a_400_naming_it():
    """Regression (found by vilex stress): Triton 2.51 passes a vilex_generate request without its required
    VILEX_TOKENS to the model, where it was a KeyError (500, a traceback with server paths)."""
    from vilex.serving.pipeline_requests import Limits, parse_request

    limits = Limits(num_queries=TINY.num_queries, hidden_size=TINY.hidden_size, max_steps=TINY.max_steps,
                    default_steps=25, default_guidance=7.5, default_size=64, height_range=(32, 128),
                    width_range=(32, 128), side_multiple=4)
    with pytest.raises(ViLexUsageError, match=r"VILEX_TOKENS is required: ViLex tokens \(n, k, 32\) float32, k in 1..75"):
        parse_request("vilex_generate", {"SEED": np.zeros((1, 1), np.int64)}, limits)


# ---- images.py: what it refuses --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_images_are_refused(fmt, tmp_path):
    data = images.animated(fmt)
    with pytest.raises(ImageInputError, match=rf"IMAGE\[0\]: animated or multi-page {fmt} \(3 frames\); send one still"):
        decode_image(data, name="IMAGE[0]")
    path = tmp_path / f"animated.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(ImageInputError, match=rf"IMAGE '{re.escape(str(path))}': animated"):
        load_image(path)


def test_a_still_gif_and_an_mpo_photo_are_read():
    still = decode_image(images.encode(images.picture().convert("P"), "GIF"))
    assert still.size == (24, 24) and still.mode == "RGB"
    photo, preview = images.picture(), images.picture().point(lambda v: 255 - v)
    mpo = images.encode(photo, "MPO", save_all=True, append_images=[preview])
    with PIL.Image.open(io.BytesIO(mpo)) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    decoded = np.asarray(decode_image(mpo)).astype(int)
    assert np.abs(decoded - np.asarray(photo).astype(int)).mean() < 8  # the photo (JPEG-compressed), not the preview


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_pixels_that_are_not_finite_are_refused(value):
    with pytest.raises(ImageInputError, match=r"IMAGE\[0\]: float pixels contain NaN or infinite values \(64 of 64\)"):
        decode_image(images.float_tiff(value), name="IMAGE[0]")
    finite = np.asarray(decode_image(images.float_tiff(0.5)))
    assert finite.shape == (8, 8, 3) and (finite == 128).all()  # 0..1 floats scale to 0..255


def test_an_image_without_pixels_is_refused():
    from vilex.images import to_rgb

    with pytest.raises(ImageInputError, match=r"IMAGE\[0\]: 0x5 pixels; an image must have at least 1x1"):
        to_rgb(PIL.Image.new("RGB", (0, 5)), name="IMAGE[0]")


def test_a_decoder_crash_is_an_unreadable_image():
    """Pillow's AVIF plugin raises RuntimeError on a damaged file (seen by fuzzing); it must not escape."""
    if "AVIF" not in images.truncatable_formats():
        pytest.skip("this Pillow has no AVIF support")
    with pytest.raises(ImageInputError, match=r"IMAGE\[0\]: bytes are not a readable image.*Missing or empty image item"):
        decode_image(images.corrupt_avif(), name="IMAGE[0]")


def test_bombs_are_refused_from_the_header():
    with pytest.raises(ImageInputError, match=r"IMAGE\[0\]: 9000x9000 pixels is above the limit of 67108864"):
        decode_image(images.webp_bomb(9000, 9000), name="IMAGE[0]")
    for bomb in (images.png_bomb(20000), images.gif_bomb(), images.webp_bomb()):
        with pytest.raises(ImageInputError, match=r"IMAGE\[0\].*(above the limit|exceeds limit)"):
            decode_image(bomb, name="IMAGE[0]")


def test_one_pixel_wide_images_are_read():
    assert decode_image(images.line_png(1, 4096)).size == (1, 4096)
    assert decode_image(images.line_png(4096, 1)).size == (4096, 1)


# ---- the case list ------------------------------------------------------------------------------------------
def test_cases_cover_the_issue():
    cases = all_cases(TINY)
    assert len({c.name for c in cases}) == len(cases)
    for protocol in ("http", "grpc"):
        malformed = [c for c in cases if protocol in c.protocols and c.expect != SERVE]
        assert len(malformed) >= 40, protocol
        assert {c.model for c in malformed} == set(TINY_INPUTS)
    names = " | ".join(c.name for c in cases)
    for fmt in images.truncatable_formats():
        assert f"{fmt} truncated" in names
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        assert f"{fmt} corrupt" in names
    for needed in ("PNG bomb", "GIF bomb", "WebP bomb", "animated GIF", "PNG 0x0", "PNG 1x4096", "not UTF-8",
                   "PROMPT of 1 MB", "one too narrow", "empty batch", "batch of 256", "no VILEX_TOKENS",
                   "unknown input", "201 MB body", "HTTP: broken JSON", "Inference-Header-Content-Length",
                   "gRPC: not a protobuf"):
        assert needed in names, needed
    # NaN and inf in every FP32 per-image input, the extremes of every integer one, as the metadata lists them
    for model in ("vilex_generate", "vilex_reconstruct"):
        for name, dtype in TINY_INPUTS[model].items():
            short = model[6:]
            if dtype == "FP32" and name != "VILEX_TOKENS":
                assert all(f"{name} {v} ({short})" in names for v in ("NaN", "+inf", "-inf")), name
            if dtype in ("INT32", "INT64"):
                assert f"{name} {dtype} min ({short})" in names, name
    assert all(c.expect in (REJECT, SERVE, FRONTEND) for c in cases)


def test_a_case_for_an_input_the_server_lacks_is_left_out():
    without_seed = Served(**{**TINY.__dict__, "inputs": {**TINY_INPUTS, "vilex_reconstruct": {
        k: v for k, v in TINY_INPUTS["vilex_reconstruct"].items() if k != "SEED"}}})
    assert any("SEED" in (c.inputs or {}) and c.model == "vilex_reconstruct" for c in all_cases(TINY))
    assert not any("SEED" in (c.inputs or {}) and c.model == "vilex_reconstruct" for c in all_cases(without_seed))


def test_stress_refuses_anything_but_loopback():
    from vilex.benchmarks.stress import parse_url

    assert parse_url("localhost:8000") == ("127.0.0.1", 8000)
    for url in ("10.0.0.5:8000", "example.com:8001", "http://127.0.0.1:8000"):
        with pytest.raises(ViLexUsageError, match="loopback|without a scheme"):
            parse_url(url)


class QueueOf:
    """Stands in for a server whose pipeline models hold `size` waiting requests (`vilex serve --max-queue size`):
    while one request runs, the next `size` wait and any more are refused at once with 503, as Triton does."""

    def __init__(self, size: int, run_s: float = 1.0):
        import threading

        self.size, self.run_s = size, run_s
        self.lock, self.idle = threading.Lock(), threading.Event()
        self.running, self.waiting, self.refused = False, 0, 0
        self.idle.set()

    def send_tensors(self, client, module, model, inputs, protocol, timeout_s):
        import time

        with self.lock:
            if not self.running:  # the blocker: runs while the others arrive
                self.running = True
                self.idle.clear()
                blocker = True
            elif self.waiting >= self.size:
                self.refused += 1
                return "503", "Exceeds maximum queue size", {}
            else:
                self.waiting += 1
                blocker = False
        if blocker:
            time.sleep(self.run_s)
            with self.lock:
                self.running = False
                self.idle.set()
        else:
            self.idle.wait(timeout_s)
            with self.lock:
                self.waiting -= 1
        if inputs["IMAGE"][0][0] != images.line_png(40, 30):
            return "400", "IMAGE[0]: bytes are not a readable image", {}
        return "200", "", {"IMAGE_OUT": np.zeros((len(inputs["IMAGE"]), 8, 8, 3), np.uint8)}


@pytest.mark.parametrize("max_queue_size, neighbours", [(2, 1), (32, 3)])
def test_batched_hostile_requests_fit_the_servers_queue(monkeypatch, max_queue_size, neighbours):
    """Issue 19, item 11: against `vilex serve --max-queue 2`, the hostile part sent each bad request with 3 valid
    ones while the model was busy, and counted the queue's 503 refusals of two of them as wrong answers. It sends
    as many as the queue holds beside the bad one (the overload part is what fills the queue on purpose)."""
    from vilex.benchmarks import hostile
    from vilex.serving import client as client_module

    class Connection:
        def close(self):
            pass

    class NoStatistics:
        def __init__(self, url):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def batch_sizes(self, model):
            return {}

    server = QueueOf(max_queue_size)
    monkeypatch.setattr(hostile, "BATCHED_CASES", ("IMAGE random bytes",))
    monkeypatch.setattr(hostile, "connect", lambda *args: (None, Connection()))
    monkeypatch.setattr(hostile, "send_tensors", server.send_tensors)
    monkeypatch.setattr(client_module, "TritonClient", NoStatistics)
    [result] = hostile.run_batched("127.0.0.1", {"http": 1}, ["http"], TINY, log=lambda *_: None,
                                   max_queue_size=max_queue_size)
    assert server.refused == 0
    assert result["passed"], result
    assert result["status"] == "400" and result["neighbours"] == result["neighbours_served"] == neighbours
    assert hostile.neighbours_for(1) == 0 and hostile.neighbours_for(0) == hostile.NEIGHBOURS  # 0: no bound


# ---- against a real server ------------------------------------------------------------------------------------
# Defects the stress run finds in files this work does not own (vilex/serving/pipeline_requests.py); the
# docs/reliability.md gives the fix. Strict: once fixed, these cases pass and this list must go.
KNOWN_DEFECTS: dict[str, str] = {
    # Found by vilex stress and fixed (regression: this run): "no VILEX_TOKENS" answered 500 KeyError (Triton
    # 2.51 passes a request without a required input to the model); "AVIF corrupt" answered 500 RuntimeError
    # and failed the 3 requests batched with it. Both are 400s naming the input now.
}


@pytest.mark.triton
def test_stress_run_against_a_real_server(served, tmp_path):
    """`vilex stress` against the session's server (conftest.py), which the other served tests share: its
    overload part fills the queue and waits until it drains, so nothing it sends outlives the test."""
    out = tmp_path / "stress-results"
    command = [sys.executable, "-m", "vilex.cli", "stress", served.http, "--quick", "--requests", "24",
               "--concurrency", "4", "--warmup", "8", "--steps", "1", "--overload-steps", "2", "--duration", "600",
               "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ})
    print(run.stdout[-6000:])
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# vilex stress:")

    # 1. Hostile: >= 40 malformed requests per protocol, each refused cleanly (but the known defects), the
    # server serving after every one.
    hostile = report["hostile"]
    for protocol, counts in hostile["per_protocol"].items():
        assert counts["malformed"] >= 40 and counts["followups_failed"] == 0, (protocol, counts)
    failed = {(c["case"], c["protocol"]): c for c in hostile["cases"] if not c["passed"]}
    assert {case for case, _ in failed} == set(KNOWN_DEFECTS), sorted(failed)
    for (case, protocol), outcome in failed.items():
        assert outcome["status"] == {"http": "500", "grpc": "StatusCode.INTERNAL"}[protocol]
        assert KNOWN_DEFECTS[case] in outcome["message"] and outcome["followup_ok"]
    assert hostile["server_alive"]
    by_name = {(c["case"], c["protocol"]): c for c in hostile["cases"]}
    assert by_name[("animated GIF (3 frames)", "grpc")]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "animated or multi-page GIF" in by_name[("animated GIF (3 frames)", "http")]["message"]
    assert by_name[("HTTP: broken JSON", "http")]["status"] in ("400", "500")  # Triton 2.51's frontend: 500
    # Sent with valid requests of the same inputs while the model was busy, so they ran as one batch: the bad one
    # gets its error, the others are served; but the known AVIF defect fails all of them (500). --quick sends them
    # over the first protocol only.
    assert sorted((b["case"], b["protocol"]) for b in hostile["batched"]) == sorted((c, "http") for c in BATCHED_CASES)
    for batched in hostile["batched"]:
        assert "4" in batched["executions_by_batch_size"], batched  # JSON keys: batch sizes as strings
        if batched["case"] in KNOWN_DEFECTS:
            assert not batched["passed"] and batched["neighbours_served"] == 0, batched
        else:
            assert batched["passed"] and batched["neighbours_served"] == 3, batched

    # 2. Soak: every request answered, right (the same answer for the same input and seed), nothing left open.
    soak = report["soak"]
    assert (soak["done"], soak["errors"], soak["hung"], soak["mismatches"]) == (24, 0, 0, 0), soak["error_examples"]
    growth = soak["resources"]["growth"]
    assert growth["shm_files"] <= 0 and growth["shm_mb"] <= 0 and growth["fds"] <= 0, growth
    models = [p for p in served.repository.iterdir() if (p / "config.pbtxt").is_file()]
    assert soak["resources"]["after"]["server_alive"] and soak["resources"]["after"]["stubs"] == len(models)  # one each

    # 3. Overload, per protocol: the excess refused at once with 503 / UNAVAILABLE, never timed out; at most
    # what the queue holds accepted, and all of it served; then served again.
    for overload in report["overload"]:
        assert overload["rejected"] >= 1 and overload["other"] == 0 and overload["hung"] == 0, overload
        assert overload["served"] + overload["rejected"] == overload["sent"]
        assert overload["served"] <= overload["capacity"]
        assert "Exceeds maximum queue size" in overload["rejection_message"]
        assert overload["rejection_latency"]["max_ms"] < 1000  # refused, not queued until a timeout (target: 100)
        assert overload["checks"]["recovered: next requests served"]

    # The exit code says whether something failed, and the findings say what: here the known defects (none since
    # they were fixed) and, on a machine too busy for them, the two latency targets (checked against figures
    # in benchmarks, never as a test's outcome).
    timing = {"every refusal within 100 ms", "recovered: p50 within 2x of before"}
    failed_checks = {name for part in [soak] + report["overload"] for name, ok in part["checks"].items() if not ok}
    assert failed_checks <= timing, failed_checks
    assert (run.returncode == 1) == (not report["passed"]) and report["passed"] == (not KNOWN_DEFECTS and not failed_checks)
    assert all(any(case in finding for finding in report["findings"]) for case in KNOWN_DEFECTS)
