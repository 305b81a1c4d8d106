"""ViLexModel: shapes, dtypes, TailDrop, trainability."""

import pytest
import torch

from vilex.errors import ViLexUsageError
from vilex.presets import tiny


@pytest.fixture(scope="module")
def vilex():
    return tiny(seed=0).vilex


def pixels(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_shapes_and_dtype(vilex):
    vilex.eval()
    out = vilex(pixels(3))
    assert out.vilex_tokens.shape == (3, 75, 32)
    assert out.vilex_tokens.dtype == torch.float32
    assert out.lengths.tolist() == [75, 75, 75]
    assert out.token_mask.all()


def test_num_tokens_keeps_the_prefix(vilex):
    vilex.eval()
    full = vilex(pixels()).vilex_tokens
    first5 = vilex(pixels(), num_tokens=5).vilex_tokens
    assert first5.shape == (2, 5, 32)
    torch.testing.assert_close(first5, full[:, :5])


def test_tokens_are_at_word_embedding_scale(vilex):
    # The projection ends in a LayerNorm times token_scale = std of the text encoder's embedding table,
    # so a fresh pooler already speaks at the scale of real word embeddings.
    vilex.eval()
    std = vilex(pixels(4)).vilex_tokens.std().item()
    assert abs(std - vilex.config.token_scale) / vilex.config.token_scale < 0.2


@pytest.mark.parametrize("k", [0, 76, -1])
def test_num_tokens_out_of_range(vilex, k):
    with pytest.raises(ViLexUsageError, match=r"num_tokens must be in 1\.\.75"):
        vilex(pixels(), num_tokens=k)


def test_taildrop_lengths_and_masks(vilex):
    vilex.train()
    g = torch.Generator().manual_seed(0)
    out = vilex(pixels(64), generator=g)
    vilex.eval()
    lengths = out.lengths
    assert lengths.min() >= vilex.config.taildrop_min_tokens and lengths.max() <= 75
    # With taildrop_prob 0.5, some samples keep all tokens and some are shortened.
    assert (lengths == 75).any() and (lengths < 75).any()
    expected_mask = torch.arange(75)[None] < lengths[:, None]
    assert torch.equal(out.token_mask, expected_mask)
    # Dropped positions are exactly zero; kept ones are not.
    assert (out.vilex_tokens[~out.token_mask] == 0).all()
    assert (out.vilex_tokens[out.token_mask].abs().sum(-1) > 0).all()


def test_taildrop_off_in_eval_and_distribution_linear_prefers_short():
    model = tiny(seed=0).vilex
    model.register_to_config(taildrop_prob=1.0, taildrop_distribution="linear")
    lengths = model.sample_taildrop_lengths(4000, torch.Generator().manual_seed(0)).float()
    # Linear weights (N - k + 1) give a mean of about N/3 instead of N/2 for uniform.
    assert lengths.mean() < 30
    model.eval()
    assert model(pixels()).lengths.tolist() == [75, 75]


def test_taildrop_harmonic_draws_lengths_in_proportion_to_one_over_k():
    model = tiny(seed=0).vilex
    model.register_to_config(taildrop_prob=1.0, taildrop_distribution="harmonic")
    lengths = model.sample_taildrop_lengths(20000, torch.Generator().manual_seed(0))
    harmonic = sum(1 / k for k in range(1, 76))  # the normaliser of 1/k over 1..75
    assert (lengths == 1).float().mean() == pytest.approx(1 / harmonic, abs=0.01)
    assert (lengths == 2).float().mean() == pytest.approx(0.5 / harmonic, abs=0.01)
    assert (lengths == 75).float().mean() == pytest.approx(1 / 75 / harmonic, abs=0.005)


def test_only_pooler_is_trainable_by_default():
    model = tiny(seed=0).vilex
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("pooler.") for name in trainable)
    assert {name for name, _ in model.named_parameters() if name.startswith("pooler.")} == trainable


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "clip_vision_model"])
def test_unfrozen_vision_encoder_is_trainable(model_type):
    from vilex.model import ViLexModel

    vision_config = dict(model_type=model_type, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8)
    model = ViLexModel(vision_config, pooler_width=32, pooler_heads=4, output_dim=32, freeze_vision=False)
    assert sum(p.requires_grad for p in model.vision_model.parameters()) >= len(list(model.vision_model.parameters())) - 2
    # The whole model trains: gradients reach the vision encoder through the pooler.
    model.train()
    model(pixels(), taildrop=False).vilex_tokens.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
