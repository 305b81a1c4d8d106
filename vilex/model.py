"""ViLexModel: image -> visual words.

    pixel_values (B, 3, H, W)
      -> vision encoder (any transformers vision model)       patch features (B, P, Dv)
      -> attention pooler: N learnable queries cross-attend to the patch features, L layers
      -> projection into the text encoder's token-embedding space, at the scale of real word embeddings
      -> vilex_tokens (B, N, D)

The tokens are fed to the frozen text encoder in place of word embeddings (see `bridge.py`).
A checkpoint may carry a mixing adapter (`MixAdapter`): tokens that words stand beside pass through it first,
so that they can leave to the words what the words say; tokens alone are never changed by it.
TailDrop (training only) drops the last k tokens per sample so that the first tokens carry the most
meaning and any prefix 1..N can be used at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from transformers import AutoConfig, AutoModel

from .errors import check_range

TAILDROP_DISTRIBUTIONS = ("uniform", "linear", "harmonic")
# Config keys added after checkpoints were saved without them, with the value their absence means: a config that
# has such a key at that value says what one written before the key existed says (the checkpoint hash agrees).
CONFIG_KEYS_ADDED = {"mix_adapter_hidden": 0, "mix_adapter_words": False}


@dataclass
class ViLexOutput(BaseOutput):
    vilex_tokens: torch.Tensor  # (B, k, D); positions at or past `lengths` are zero
    lengths: torch.Tensor  # (B,) int64: how many leading tokens each sample keeps
    token_mask: torch.Tensor  # (B, k) bool: True where a token is kept


class PoolerLayer(nn.Module):
    """Pre-norm block: queries cross-attend to the patch features, then an MLP.

    With `self_attention` the keys and values are the patch features concatenated with the queries
    themselves (Flamingo's Perceiver resampler), so the queries also attend to each other.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, self_attention: bool = False):
        super().__init__()
        self.heads = heads
        self.self_attention = self_attention
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        self.to_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        B, N, W = queries.shape
        normed_queries = self.norm_q(queries)
        context = self.norm_kv(features)  # (B, P, W)
        if self.self_attention:
            context = torch.cat([context, normed_queries], dim=1)  # (B, P + N, W)
        P = context.shape[1]
        q = self.to_q(normed_queries).view(B, N, self.heads, W // self.heads).transpose(1, 2)  # (B, h, N, W/h)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(B, P, self.heads, W // self.heads).transpose(1, 2)  # (B, h, P, W/h)
        v = v.view(B, P, self.heads, W // self.heads).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, W/h)
        queries = queries + self.to_out(attended.transpose(1, 2).reshape(B, N, W))
        return queries + self.mlp(self.norm_mlp(queries))


class AttentionPooler(nn.Module):
    def __init__(self, feature_dim: int, num_queries: int, width: int, depth: int, heads: int, output_dim: int,
                 self_attention: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.feature_proj = nn.Linear(feature_dim, width)
        self.layers = nn.ModuleList([PoolerLayer(width, heads, self_attention=self_attention) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, output_dim)
        # Unit-variance outputs; the model multiplies by the word-embedding scale afterwards.
        self.norm_tokens = nn.LayerNorm(output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.feature_proj(features)  # (B, P, W)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # (B, N, W)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.norm_tokens(self.proj_out(self.norm_out(queries)))  # (B, N, D)


class MixAdapter(nn.Module):
    """What the tokens become when words stand beside them: tokens + a per-token MLP of them (B, k, D).

    ViLex mixes tokens and words zero-shot on a base that has learned to let words compose; a small base
    that has seen only captions reads the tokens' color over a following color word. This adapter is
    trained (`vilex train --mix-adapter`) on edits with everything else frozen, so the tokens alone, and
    every figure measured from them, stay what they were. It works in the pooler's unit scale: the
    tokens divided by `token_scale`, a residual MLP with a learned embedding per token position, and the
    result scaled back. The last layer starts at zero, so a new adapter changes nothing.

    With `words`, the adapter also reads the words beside the tokens: the mean of their word embeddings
    (B, D), LayerNorm-ed and projected, is added with the position, so it can rewrite what a word asks
    for (the object's color) instead of only making the tokens yield to it.
    """

    def __init__(self, num_queries: int, dim: int, hidden: int, token_scale: float, words: bool = False):
        super().__init__()
        self.token_scale = token_scale
        self.positions = nn.Parameter(torch.zeros(num_queries, dim))
        self.norm = nn.LayerNorm(dim)
        self.words_norm = nn.LayerNorm(dim) if words else None
        self.words_proj = nn.Linear(dim, dim) if words else None
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, k, D), k <= num_queries, the first k positions -> (B, k, D); each token on its own (with its
        position and, with `words`, the row's words (B, D), the mean of their embeddings), so a prefix of the
        result is the result of the prefix."""
        units = tokens / self.token_scale
        k = units.shape[1]
        x = self.norm(units) + self.positions[:k]
        if self.words_proj is not None:
            if words is None:
                raise ValueError("this mixing adapter reads the words beside the tokens: give `words` (B, D)")
            x = x + self.words_proj(self.words_norm(words.to(x.dtype)))[:, None]
        hidden = F.gelu(self.fc1(x))
        return (units + self.fc2(hidden)) * self.token_scale


class ViLexModel(ModelMixin, ConfigMixin):
    """Vision encoder + attention pooler producing `num_queries` visual words of width `output_dim`.

    Args:
        vision_config: a transformers vision config as a dict (must contain `model_type`, e.g.
            "siglip_vision_model" or "clip_vision_model").
        num_queries: N, the maximum number of ViLex tokens (at most 75 for a 77-position CLIP encoder).
        pooler_depth / pooler_heads / pooler_width: size of the attention pooler.
        output_dim: D, the text encoder's hidden size (its token-embedding width).
        token_scale: per-dimension standard deviation of the produced tokens; set to the text
            encoder's word-embedding std so the tokens start at the scale of real word embeddings.
        taildrop_prob: probability that a training sample is shortened.
        taildrop_distribution: "uniform" (kept length uniform in min..N), "linear" (short prefixes
            sampled more often, weight proportional to N - k + 1) or "harmonic" (weight 1 / k: every
            doubling of the length is drawn about equally often, so 1..4 tokens are trained as often as
            16..32; with uniform and N = 32, one token is trained in 1.6% of the samples).
        taildrop_min_tokens: the shortest prefix TailDrop keeps.
        freeze_vision: whether the vision encoder is frozen during training.
        pooler_self_attention: the queries attend to the patch features and to each other (Perceiver
            resampler) instead of to the patch features only.
        mix_adapter_hidden: hidden width of the mixing adapter (`MixAdapter`); 0: none, the tokens stand
            beside words as they are.
        mix_adapter_words: the mixing adapter also reads the words beside the tokens.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vision_config: dict,
        num_queries: int = 75,
        pooler_depth: int = 2,
        pooler_heads: int = 8,
        pooler_width: int = 768,
        output_dim: int = 768,
        token_scale: float = 0.014,
        taildrop_prob: float = 0.5,
        taildrop_distribution: str = "uniform",
        taildrop_min_tokens: int = 1,
        freeze_vision: bool = True,
        pooler_self_attention: bool = False,
        mix_adapter_hidden: int = 0,
        mix_adapter_words: bool = False,
    ):
        super().__init__()
        if taildrop_distribution not in TAILDROP_DISTRIBUTIONS:
            raise ValueError(f"taildrop_distribution must be one of {TAILDROP_DISTRIBUTIONS}, got {taildrop_distribution!r}")
        check_range("num_queries", num_queries, 1, 75)
        check_range("taildrop_min_tokens", taildrop_min_tokens, 1, num_queries)
        if pooler_width % pooler_heads:
            raise ValueError(f"pooler_width ({pooler_width}) must be divisible by pooler_heads ({pooler_heads})")
        vision_config = dict(vision_config)
        model_type = vision_config.pop("model_type")
        if model_type == "siglip_vision_model":
            # ViLex pools the patch features itself; SigLIP's own attention-pooling head would be dead weight
            # (and unused parameters that require grad break DistributedDataParallel).
            vision_config["vision_use_head"] = False
        self.vision_model = AutoModel.from_config(AutoConfig.for_model(model_type, **vision_config))
        self.pooler = AttentionPooler(
            self.vision_model.config.hidden_size, num_queries, pooler_width, pooler_depth, pooler_heads, output_dim,
            self_attention=pooler_self_attention,
        )
        check_range("mix_adapter_hidden", mix_adapter_hidden, 0)
        if mix_adapter_words and not mix_adapter_hidden:
            raise ValueError("mix_adapter_words needs a mixing adapter (mix_adapter_hidden > 0)")
        self.mix_adapter = (MixAdapter(num_queries, output_dim, mix_adapter_hidden, token_scale, mix_adapter_words)
                            if mix_adapter_hidden else None)
        self.vision_model.requires_grad_(not freeze_vision)
        if model_type == "clip_vision_model":
            # CLIP's post_layernorm only feeds its pooled output, which ViLex does not use (SigLIP's is
            # part of last_hidden_state): never trainable, so every trainable parameter gets a gradient.
            for name, parameter in self.vision_model.named_parameters():
                if "post_layernorm" in name:
                    parameter.requires_grad_(False)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def add_mix_adapter(self, hidden: int, words: bool = False) -> MixAdapter:
        """Give a model without one a new mixing adapter (it changes nothing until trained); a model that has
        one keeps it, if its hidden width is `hidden` and it reads the words as `words` says."""
        check_range("mix_adapter_hidden", hidden, 1)
        if self.mix_adapter is not None:
            if self.config.mix_adapter_hidden != hidden:
                raise ValueError(f"this ViLex model has a mixing adapter of hidden width "
                                 f"{self.config.mix_adapter_hidden}, not {hidden}")
            has_words = bool(self.config.get("mix_adapter_words", False))
            if has_words != words:
                raise ValueError(f"this ViLex model has a mixing adapter that "
                                 f"{'reads' if has_words else 'does not read'} the words beside the tokens")
            return self.mix_adapter
        reference = self.pooler.queries
        self.mix_adapter = MixAdapter(self.config.num_queries, self.config.output_dim, hidden,
                                      self.config.token_scale, words).to(reference.device, reference.dtype)
        self.register_to_config(mix_adapter_hidden=hidden, mix_adapter_words=words)
        return self.mix_adapter

    def mix_tokens(self, tokens: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens (B, k, D) as they stand beside words (B, D: the mean of each row's word embeddings):
        through the mixing adapter, or unchanged without one."""
        if self.mix_adapter is None:
            return tokens
        reference = self.mix_adapter.positions
        words = None if words is None else words.to(reference.device, reference.dtype)
        return self.mix_adapter(tokens.to(reference.device, reference.dtype), words)

    def trainable_parameters(self):
        """The parameters that require grad (as built: the pooler, any mixing adapter, and the vision encoder
        unless `freeze_vision`; `vilex train` sets them itself, training/setup.py)."""
        return [p for p in self.parameters() if p.requires_grad]

    def sample_taildrop_lengths(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample number of kept tokens, (B,) int64 in taildrop_min_tokens..N."""
        N, low = self.config.num_queries, self.config.taildrop_min_tokens
        device = self.pooler.queries.device
        candidates = torch.arange(low, N + 1)
        if self.config.taildrop_distribution == "uniform":
            weights = torch.ones(len(candidates))
        elif self.config.taildrop_distribution == "linear":  # short prefixes more often
            weights = (N - candidates + 1).float()
        else:  # "harmonic": 1 / k
            weights = 1.0 / candidates.float()
        drawn = candidates[torch.multinomial(weights, batch_size, replacement=True, generator=generator)]
        dropped = torch.rand(batch_size, generator=generator) < self.config.taildrop_prob
        return torch.where(dropped, drawn, torch.full_like(drawn, N)).to(device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        num_tokens: int | None = None,
        taildrop: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> ViLexOutput:
        """pixel_values (B, 3, H, W) -> ViLexOutput with tokens (B, k, D).

        num_tokens keeps the first k tokens (1..N; default N). TailDrop runs when `taildrop` is True,
        or by default in training mode.
        """
        N = self.config.num_queries
        k = N if num_tokens is None else int(num_tokens)
        check_range("num_tokens", k, 1, N)
        features = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
        tokens = self.pooler(features)[:, :k] * self.config.token_scale  # (B, k, D)
        B = tokens.shape[0]
        if taildrop if taildrop is not None else self.training:
            lengths = self.sample_taildrop_lengths(B, generator).clamp(max=k)
        else:
            lengths = torch.full((B,), k, dtype=torch.long, device=tokens.device)
        token_mask = torch.arange(k, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, k)
        tokens = tokens * token_mask.unsqueeze(-1).to(tokens.dtype)
        return ViLexOutput(vilex_tokens=tokens, lengths=lengths, token_mask=token_mask)
