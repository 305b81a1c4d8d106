"""A small CLIP BPE tokenizer built locally, for the preset checkpoints (no download).

It is a real `CLIPTokenizer` (byte-level BPE, `</w>` word ends, the CLIP special tokens): every byte
is in the vocabulary, so any text tokenizes, and a few hundred common words are single tokens. The
real SD tokenizer has 49,408 entries; ids from this one are a subset of a text encoder's table.
"""

from __future__ import annotations

from typing import Sequence

from transformers import CLIPTokenizer

# Words that become single tokens; everything else falls back to sub-words and bytes.
COMMON_WORDS = """a an the of in on at to and with for by from is are this that it as
photo picture image painting drawing sketch render style watercolor oil pencil cartoon anime
cat dog bird horse car house tree flower mountain river sea sky sun moon city street man woman
child person face portrait landscape red green blue yellow black white orange purple pink brown
gray grey bright dark light small large big little old new beautiful detailed high quality""".split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of GPT-2/CLIP BPE (the same table CLIP's tokenizer uses).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_merges(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair of lowest merge rank."""
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_clip_tokenizer(model_max_length: int = 77, words: Sequence[str] = COMMON_WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which each of `words` is a single token (the toy world passes its caption
    vocabulary).

    BPE applies the lowest-ranked merge present first, so a word's own merges must start from the pieces the
    earlier words' merges already cut it into; its new merges then join those pieces left to right. New
    merges rank after all earlier ones, so they never break an earlier word.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            ranks[(merged, piece)] = len(ranks)
            merged = merged + piece
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)
