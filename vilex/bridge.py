"""The soft-prompt bridge: ViLex tokens (and optional text) -> CLIP text-encoder hidden states.

The text encoder's input is built as word embeddings:

    [BOS] [ViLex tokens | text tokens in either order] [EOS] [PAD ...]   (77 positions for CLIP)

Text tokens come from the real tokenizer and the encoder's own embedding table, so a text-only prompt
gives exactly the stock encoder's input. ViLex tokens that text stands beside first pass through `mix`
(the ViLex model's mixing adapter, where its checkpoint has one); ViLex tokens alone never do. Position
embeddings are added inside the encoder, as usual.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ViLexUsageError

ORDERS = ("vilex_first", "text_first")


class TextEncoderFromEmbeds(nn.Module):
    """Runs a CLIPTextModel on word embeddings: (B, T, D) -> last_hidden_state (B, T, D).

    transformers 5's `CLIPTextModel.forward` accepts only token ids, so this repeats its body
    (embeddings with `inputs_embeds`, an explicit causal mask and is_causal, encoder, final layer norm).
    The mask has the dtype of the hidden states, so the encoder runs in fp16/bf16 as the stock one does.
    It is also the export wrapper of the `text_encoder` graph. Tests check it against the stock forward
    under the eager and SDPA attention kernels and one that ignores masks.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        model = self.text_encoder
        hidden_states = model.embeddings(inputs_embeds=inputs_embeds)  # adds position embeddings
        T = hidden_states.shape[1]
        # In the states' dtype: SDPA takes the mask as given, and a float32 mask with fp16/bf16 queries fails
        # in CUDA's memory-efficient kernel ("invalid dtype for bias") and is misread by cuDNN's (NaNs).
        causal_mask = torch.full((T, T), torch.finfo(hidden_states.dtype).min, dtype=hidden_states.dtype,
                                 device=hidden_states.device)
        causal_mask = causal_mask.triu(1)[None, None]  # (1, 1, T, T), additive
        # Both, as the stock forward passes both: kernels that take 4-D masks (eager, SDPA with a mask,
        # the ONNX graph) apply the mask; kernels that ignore them (flash-attention 2) apply is_causal.
        # With only the mask, such a kernel would run the frozen encoder bidirectionally without an error.
        hidden_states = model.encoder(inputs_embeds=hidden_states, attention_mask=causal_mask,
                                      is_causal=True).last_hidden_state
        return model.final_layer_norm(hidden_states)


class PromptBuilder:
    """Assembles the text encoder's word-embedding input from ViLex tokens and text."""

    def __init__(self, tokenizer, token_embedding: nn.Embedding,
                 mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.token_embedding = token_embedding
        # (tokens (B, k, D), words (B, D): the mean of each row's text embeddings) -> (B, k, D), token by token:
        # ViLex tokens beside text; None: as they are
        self.mix = mix
        self.max_length = int(tokenizer.model_max_length)

    @property
    def pad_id(self) -> int:
        """The token after EOS up to the encoder's length: the tokenizer's padding token, or EOS without one."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def text_ids(self, prompt: str) -> list[int]:
        """Token ids of `prompt` without BOS/EOS."""
        ids = self.tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        return list(ids)

    def max_text_tokens(self, num_vilex_tokens: int) -> int:
        return self.max_length - 2 - num_vilex_tokens

    def max_vilex_tokens(self, prompt: str | None) -> int:
        """How many ViLex tokens fit beside `prompt`."""
        return self.max_length - 2 - (len(self.text_ids(prompt)) if prompt else 0)

    def check_fits(self, prompt: str | None, num_vilex_tokens: int) -> int:
        """Raise a ViLexUsageError unless the prompt fits next to the tokens; return its token count."""
        n_text = len(self.text_ids(prompt)) if prompt else 0
        self._check_room(n_text, num_vilex_tokens)
        return n_text

    def _check_room(self, n_text: int, num_vilex_tokens: int) -> None:
        fit = self.max_text_tokens(num_vilex_tokens)
        if n_text > fit:
            raise ViLexUsageError(
                f"prompt is too long: {n_text} text tokens, but with {num_vilex_tokens} ViLex tokens "
                f"at most {max(fit, 0)} text tokens fit in the encoder's {self.max_length} positions"
            )

    def __call__(
        self,
        vilex_tokens: torch.Tensor | None,
        prompts: Sequence[str | None] | None = None,
        lengths: torch.Tensor | None = None,
        order: str = "vilex_first",
    ) -> torch.Tensor:
        """Word embeddings (B, T, D) for the text encoder.

        vilex_tokens: (B, k, D) or None for text-only prompts; `lengths` (B,) keeps a prefix per sample
        (TailDrop). prompts: one string (or None) per sample, or None for ViLex-only.
        """
        if order not in ORDERS:
            raise ViLexUsageError(f"order must be one of {ORDERS}, got {order!r}")
        if vilex_tokens is None and prompts is None:
            raise ViLexUsageError("give vilex_tokens, prompts or both")
        B = vilex_tokens.shape[0] if vilex_tokens is not None else len(prompts)
        if prompts is not None and len(prompts) != B:
            raise ViLexUsageError(f"got {len(prompts)} prompts for a batch of {B} token sequences")
        table = self.token_embedding.weight
        tok = self.tokenizer
        bos, eos, pad = (table[i] for i in (tok.bos_token_id, tok.eos_token_id, self.pad_id))  # each (D,)
        texts = []  # (n_text, D) per row
        for b in range(B):
            prompt = prompts[b] if prompts is not None else None
            ids = self.text_ids(prompt) if prompt else []
            texts.append(table[torch.tensor(ids, dtype=torch.long, device=table.device)] if ids else table[:0])
        mixed = None  # the tokens as they stand beside text, for the rows that have text (one call for the batch)
        if self.mix is not None and vilex_tokens is not None and any(len(text) for text in texts):
            words = torch.stack([text.mean(0) if len(text) else torch.zeros_like(bos) for text in texts])  # (B, D)
            mixed = self.mix(vilex_tokens, words)
        rows = []
        for b in range(B):
            k = 0
            if vilex_tokens is not None:
                k = int(lengths[b]) if lengths is not None else vilex_tokens.shape[1]
            text = texts[b]  # tokenized once, above
            self._check_room(len(text), k)
            source = mixed if len(text) and mixed is not None else vilex_tokens
            vilex = source[b, :k].to(table.device, table.dtype) if k else table[:0]
            middle = [vilex, text] if order == "vilex_first" else [text, vilex]
            row = torch.cat([bos[None], *middle, eos[None]])  # (2 + k + n_text, D)
            padding = pad[None].expand(self.max_length - row.shape[0], -1)
            rows.append(torch.cat([row, padding]))
        return torch.stack(rows)  # (B, T, D)
