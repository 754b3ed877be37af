"""Tokenizers built in-process: no machine here can download one from a hub."""

from __future__ import annotations

from typing import Any


def build_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A `transformers.CLIPTokenizer` built from open_clip's bundled BPE vocabulary.

    Same ids as OpenAI CLIP's tokenizer; no download. open_clip names its special
    tokens `<start_of_text>`/`<end_of_text>`, transformers expects the OpenAI spelling.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # tuples, in rank order
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
