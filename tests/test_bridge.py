"""The soft-prompt bridge: text-only equals the stock encoder; tokens land where intended."""

import pytest
import torch
import torch.nn.functional as F

from vilex import ViLexPipeline
from vilex.bridge import PromptBuilder, TextEncoderFromEmbeds
from vilex.errors import ViLexUsageError
from vilex.presets import tiny


@pytest.fixture(scope="module")
def parts():
    pipeline = tiny(seed=0)
    return pipeline.tokenizer, pipeline.text_encoder.eval()


def test_text_only_equals_stock_text_encoder(parts):
    tokenizer, text_encoder = parts
    prompts = ["a photo of a cat", "", "a watercolor painting of a red house by the sea"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        stock = text_encoder(input_ids=ids).last_hidden_state
        builder = PromptBuilder(tokenizer, text_encoder.get_input_embeddings())
        inputs_embeds = builder(None, prompts)
        ours = TextEncoderFromEmbeds(text_encoder)(inputs_embeds)
    # Same input embeddings, same computation: exactly equal.
    assert torch.equal(inputs_embeds, text_encoder.get_input_embeddings()(ids))
    assert torch.equal(ours, stock)


def _mask_ignoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                             **kwargs):
    """An attention kernel that, like flash-attention 2, ignores 4-D masks and is causal only when told."""
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling,
                                                              is_causal=bool(is_causal))
    return output.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "mask_ignoring"])
def test_causal_under_every_attention_kernel(implementation):
    """The frozen encoder stays causal whatever kernel runs it: equal to the stock forward, and the first
    positions do not change when later ones do."""
    from transformers import AttentionInterface

    AttentionInterface.register("mask_ignoring", _mask_ignoring_attention)
    pipeline = tiny(seed=0)
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder.eval()
    text_encoder.set_attn_implementation(implementation)
    assert text_encoder.config._attn_implementation == implementation
    ids = tokenizer(["a photo of a cat", "a red house"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        stock = text_encoder(input_ids=ids).last_hidden_state
        embeds = text_encoder.get_input_embeddings()(ids)
        ours = TextEncoderFromEmbeds(text_encoder)(embeds)
        changed = embeds.clone()
        changed[:, 10:] += 1.0
        ours_changed = TextEncoderFromEmbeds(text_encoder)(changed)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours_changed[:, :10], ours[:, :10])  # causal: position i sees only 0..i
    assert not torch.allclose(ours_changed[:, 10:], ours[:, 10:])


def test_bf16_mask_has_the_states_dtype():
    """In bfloat16 (as under --mixed-precision or torch-bf16 on a GPU) the causal mask reaching attention is
    bfloat16 too: CUDA's SDPA kernels take it as given and fail or misread a float32 one (issue 18). CPU
    attention accepts either, so the dtype is checked where attention receives it, and the output against
    the stock forward in bfloat16."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []  # (query dtype, mask dtype) per attention call

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, None if attention_mask is None else attention_mask.dtype))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dtype_recording", recording_sdpa)
    pipeline = tiny(seed=0)
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder.eval().to(torch.bfloat16)
    ids = tokenizer(["a photo of a cat", "a red house"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        text_encoder.set_attn_implementation("sdpa")
        stock = text_encoder(input_ids=ids).last_hidden_state
        text_encoder.set_attn_implementation("dtype_recording")
        ours = TextEncoderFromEmbeds(text_encoder)(text_encoder.get_input_embeddings()(ids))
    assert seen and all(mask == query == torch.bfloat16 for query, mask in seen), seen
    assert ours.dtype == torch.bfloat16
    # Equal on this machine (max difference 0.0); a kernel that sums in another order may differ by bfloat16's
    # rounding, about 1e-2 on these values of order 1.
    torch.testing.assert_close(ours.float(), stock.float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("order", ["vilex_first", "text_first"])
def test_tokens_and_text_go_where_intended(parts, order):
    tokenizer, text_encoder = parts
    table = text_encoder.get_input_embeddings()
    builder = PromptBuilder(tokenizer, table)
    vilex_tokens = torch.randn(2, 5, 32)
    prompt = "in the style of a watercolor"
    text_ids = builder.text_ids(prompt)
    n = len(text_ids)
    embeds = builder(vilex_tokens, [prompt, prompt], order=order)
    assert embeds.shape == (2, 77, 32)
    w = table.weight
    assert torch.equal(embeds[:, 0], w[tokenizer.bos_token_id].expand(2, -1))
    vilex_at, text_at = (slice(1, 6), slice(6, 6 + n)) if order == "vilex_first" else (slice(1 + n, 6 + n), slice(1, 1 + n))
    assert torch.equal(embeds[:, vilex_at], vilex_tokens)
    assert torch.equal(embeds[0, text_at], w[text_ids])
    assert torch.equal(embeds[:, 6 + n], w[tokenizer.eos_token_id].expand(2, -1))
    assert torch.equal(embeds[:, 7 + n:], w[tokenizer.pad_token_id].expand(2, 77 - 7 - n, -1))


def test_vilex_only_and_taildrop_lengths(parts):
    tokenizer, text_encoder = parts
    w = text_encoder.get_input_embeddings().weight
    builder = PromptBuilder(tokenizer, text_encoder.get_input_embeddings())
    vilex_tokens = torch.randn(2, 10, 32)
    embeds = builder(vilex_tokens, lengths=torch.tensor([10, 3]))
    assert torch.equal(embeds[0, 1:11], vilex_tokens[0])
    assert torch.equal(embeds[0, 11], w[tokenizer.eos_token_id])
    # The second sample keeps 3 tokens: EOS right after them, the dropped ones never reach the encoder.
    assert torch.equal(embeds[1, 1:4], vilex_tokens[1, :3])
    assert torch.equal(embeds[1, 4], w[tokenizer.eos_token_id])


def test_gradients_flow_into_tokens(parts):
    tokenizer, text_encoder = parts
    builder = PromptBuilder(tokenizer, text_encoder.get_input_embeddings())
    vilex_tokens = torch.randn(1, 4, 32, requires_grad=True)
    TextEncoderFromEmbeds(text_encoder)(builder(vilex_tokens, ["a cat"])).sum().backward()
    assert vilex_tokens.grad is not None and vilex_tokens.grad.abs().sum() > 0


def test_prompt_overflow_says_how_many_fit(parts):
    tokenizer, text_encoder = parts
    builder = PromptBuilder(tokenizer, text_encoder.get_input_embeddings())
    with pytest.raises(ViLexUsageError, match=r"at most 0 text tokens fit"):
        builder(torch.randn(1, 75, 32), ["a cat"])
    long_prompt = " ".join(["cat"] * 70)
    n = len(builder.text_ids(long_prompt))
    with pytest.raises(ViLexUsageError, match=rf"prompt is too long: {n} text tokens, .* at most 59 text tokens fit"):
        builder(torch.randn(1, 16, 32), [long_prompt])


def test_tokens_beside_words_pass_through_the_mixing_adapter_and_tokens_alone_never_do(tiny_pipeline, tmp_path):
    """The adapter against its formula written out (tokens / scale + MLP(LayerNorm + position), scaled back),
    applied to the rows with words only; a new adapter changes nothing; it survives save and load."""
    vilex, builder = tiny_pipeline.vilex, tiny_pipeline.prompt_builder
    tokens = torch.randn(3, 4, vilex.config.output_dim) * vilex.config.token_scale
    prompts = ["a watercolor", None, "blue"]
    before = builder(tokens, prompts)
    adapter = vilex.add_mix_adapter(8)
    torch.testing.assert_close(builder(tokens, prompts), before, rtol=1e-6, atol=0)  # new: the identity
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        embeds = builder(tokens, prompts, lengths=torch.tensor([4, 4, 2]))
    s = vilex.config.token_scale
    p = dict(adapter.named_parameters())
    for row, k in ((0, 4), (2, 2)):
        units = tokens[row, :k] / s
        x = F.layer_norm(units, (units.shape[-1],), p["norm.weight"], p["norm.bias"]) + p["positions"][:k]
        hidden = F.gelu(x @ p["fc1.weight"].T + p["fc1.bias"])
        expected = (units + hidden @ p["fc2.weight"].T + p["fc2.bias"]) * s
        torch.testing.assert_close(embeds[row, 1:1 + k], expected.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(embeds[1], before[1])  # the tokens alone: untouched
    assert not torch.allclose(embeds[0, 1:5], tokens[0], atol=1e-4)

    tiny_pipeline.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    loaded = ViLexPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.vilex.config.mix_adapter_hidden == 8
    assert torch.equal(loaded.prompt_builder(tokens, prompts), builder(tokens, prompts))


def test_an_adapter_that_reads_the_words_adds_their_mean_embedding_to_every_token(tiny_pipeline, tmp_path):
    """The word-reading adapter against its formula: the row's text embeddings (the encoder's own table, from the
    real tokenizer) averaged, LayerNorm-ed and projected, added beside each token's position; another word gives
    other tokens; it needs its words; it survives save and load."""
    vilex, builder = tiny_pipeline.vilex, tiny_pipeline.prompt_builder
    tokens = torch.randn(3, 4, vilex.config.output_dim) * vilex.config.token_scale
    adapter = vilex.add_mix_adapter(8, words=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    prompts = ["a blue watercolor", None, "red"]
    embeds = builder(tokens, prompts)
    s, p = vilex.config.token_scale, dict(adapter.named_parameters())
    table = tiny_pipeline.text_encoder.get_input_embeddings().weight
    tok = tiny_pipeline.tokenizer
    for row in (0, 2):
        ids = tok(prompts[row], add_special_tokens=False)["input_ids"]
        words = F.layer_norm(table[ids].mean(0), (table.shape[1],), p["words_norm.weight"], p["words_norm.bias"])
        units = tokens[row] / s
        x = (F.layer_norm(units, (units.shape[-1],), p["norm.weight"], p["norm.bias"]) + p["positions"][:4]
             + words @ p["words_proj.weight"].T + p["words_proj.bias"])
        hidden = F.gelu(x @ p["fc1.weight"].T + p["fc1.bias"])
        expected = (units + hidden @ p["fc2.weight"].T + p["fc2.bias"]) * s
        torch.testing.assert_close(embeds[row, 1:5], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(embeds[1, 1:5], tokens[1], rtol=0, atol=0)  # the tokens alone: untouched
    other = builder(tokens, ["a green watercolor", None, "red"])
    assert not torch.allclose(other[0, 1:5], embeds[0, 1:5], atol=1e-4)  # another word, other tokens
    assert torch.equal(other[2], embeds[2])
    with pytest.raises(ValueError, match="give `words`"):
        vilex.mix_tokens(tokens)
    with pytest.raises(ValueError, match="has a mixing adapter that reads the words"):
        vilex.add_mix_adapter(8)

    tiny_pipeline.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    loaded = ViLexPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.vilex.config.mix_adapter_words is True
    assert torch.equal(loaded.prompt_builder(tokens, prompts), embeds)
