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


# Words the demo prompts use get one piece each; anything else falls back to letters.
_T5_WORDS = " ".join(
    (
        "a an the of on in with and photo picture sks shape shapes circle square triangle star",
        "red green blue yellow orange purple white black gray grey pink brown background",
        "backdrop small large big drawn product style",
    )
).split(" ")
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-/()"


def build_t5_tokenizer(model_max_length: int = 32) -> Any:
    """A `transformers.T5Tokenizer` (Unigram, tokenizers-backed) built from a word list.

    T5's real SentencePiece model is a download; for tiny offline models any Unigram
    vocabulary with T5's special tokens (<pad>=0, </s>=1, <unk>=2) behaves the same way.
    Scores are log-probabilities: a whole word (-5) beats spelling it out (-10 a letter).
    `model_max_length` is what the pipelines' T5 branch pads to (see families).
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(f"\u2581{w}", -5.0) for w in _T5_WORDS]
    vocab += [(f"\u2581{c}", -9.0) for c in _T5_CHARS]
    vocab += [(c, -10.0) for c in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_char_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A `CLIPTokenizer` over single letters and digits (no merges, no open_clip needed):
    for machines that have transformers but not open_clip, where only shapes matter."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c] = len(vocab)
        vocab[f"{c}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
