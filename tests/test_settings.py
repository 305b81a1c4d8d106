"""One source of truth for generation settings: the same defaults everywhere, NaN and inf refused everywhere."""

import inspect
import math

import pytest
import torch

from vilex import settings
from vilex.errors import ViLexUsageError, check_range


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_range_refuses_non_finite_values(value):
    # Plain comparisons let NaN through (every comparison with NaN is False): it must be refused.
    with pytest.raises(ViLexUsageError, match=r"guidance must be in 0\.\.100, got"):
        check_range("guidance", value, 0.0, 100.0)
    with pytest.raises(ViLexUsageError, match="steps must be in >= 1"):
        check_range("steps", value, 1)


def test_check_range_takes_large_ints_and_refuses_non_numbers():
    check_range("SEED", 2**63 - 1, 0, settings.MAX_SEED)
    with pytest.raises(ViLexUsageError, match="SEED must be in"):
        check_range("SEED", 2**64, 0, settings.MAX_SEED)
    with pytest.raises(ViLexUsageError, match="steps must be a number, got '25'"):
        check_range("steps", "25", 1)


def test_library_cli_and_server_share_the_defaults(tiny_pipeline):
    from vilex.cli import build_parser
    from vilex.serving.remote import RemotePipeline

    library = inspect.signature(type(tiny_pipeline).generate).parameters
    assert library["num_inference_steps"].default == settings.DEFAULT_STEPS
    assert library["guidance_scale"].default == settings.DEFAULT_GUIDANCE
    assert library["order"].default == settings.DEFAULT_ORDER
    remote = inspect.signature(RemotePipeline.generate).parameters
    assert {n: remote[n].default for n in ("num_inference_steps", "guidance_scale", "order")} == \
           {n: library[n].default for n in ("num_inference_steps", "guidance_scale", "order")}
    args = build_parser().parse_args(["generate", "ck", "--tokens", "t", "--out", "o"])
    assert (args.steps, args.guidance, args.order) == (settings.DEFAULT_STEPS, settings.DEFAULT_GUIDANCE,
                                                       settings.DEFAULT_ORDER)


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance_scale": math.nan}, r"guidance_scale must be in 0\.\.100, got nan"),
    ({"guidance_scale": math.inf}, r"guidance_scale must be in 0\.\.100, got inf"),
    ({"prompt": "red", "text_guidance_scale": math.nan}, r"text_guidance_scale must be in 0\.\.100, got nan"),
    ({"prompt": "red", "text_guidance_scale": -1.0}, r"text_guidance_scale must be in 0\.\.100, got -1"),
    ({"num_inference_steps": math.nan}, r"num_inference_steps must be in 1\.\.1000, got nan"),
    ({"order": "middle"}, r"order must be one of vilex_first, text_first, got 'middle'"),
    ({"seed": -1}, r"seed must be in 0\.\.9223372036854775807, got -1"),
])
def test_generate_refuses_bad_settings(tiny_pipeline, kwargs, message):
    tokens = torch.zeros(1, 4, tiny_pipeline.text_encoder.config.hidden_size)
    with pytest.raises(ViLexUsageError, match=message):
        tiny_pipeline.generate(tokens, **{"num_inference_steps": 1, **kwargs})


@pytest.mark.parametrize("flag, value", [("--guidance", "nan"), ("--guidance", "inf"), ("--text-guidance", "nan"),
                                         ("--text-guidance", "-0.5")])
def test_cli_refuses_non_finite_guidance_before_loading(flag, value, tmp_path, capsys):
    from vilex.cli import main

    # CKPT does not exist: the settings are checked first, so the error is about the flag.
    code = main(["generate", str(tmp_path / "no-ckpt"), "--tokens", str(tmp_path / "t"), "--out", str(tmp_path / "o"),
                 flag, value])
    assert code == 2
    assert f"{flag} must be in 0..100, got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
