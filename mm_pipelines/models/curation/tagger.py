"""A CLIP zero-shot tagger that writes sentences.

A vocabulary is a sentence template with slots (`{colour} {shape} on ...`) and the words
each slot can take; every combination is one candidate sentence. An image's caption is the
candidate whose text vector is closest to the image vector (the vectors `clip_embeddings`
already stored: tagging costs one matrix product), with the softmax probability over all
candidates at CLIP's logit scale as its confidence.

Each slot `x` can also be used as `{x_article}` ("a" / "an") in the template.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm_pipelines.models.clip.encode import encode_texts
from mm_pipelines.models.clip.loading import ClipBundle


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used (names the file and the field)."""


@dataclass(frozen=True)
class Vocabulary:
    template: str
    slots: dict[str, tuple[str, ...]]
    distinct: tuple[tuple[str, str], ...] = ()  # slot pairs that never take the same word

    def combos(self) -> list[dict[str, str]]:
        names = list(self.slots)
        out = []
        for words in itertools.product(*(self.slots[n] for n in names)):
            combo = dict(zip(names, words, strict=True))
            if all(combo[a] != combo[b] for a, b in self.distinct):
                out.append(combo)
        return out

    def sentence(self, combo: dict[str, str]) -> str:
        articles = {f"{k}_article": ("an" if v[:1] in "aeiou" else "a") for k, v in combo.items()}
        return self.template.format(**combo, **articles)

    @property
    def version(self) -> str:
        blob = json.dumps([self.template, self.slots, self.distinct], sort_keys=True)
        return "vocab-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def demo_vocabulary() -> Vocabulary:
    """The demo's world: colours x shapes x backgrounds, as `shapes.caption_for` writes them."""
    from mm_pipelines.models.demo import shapes

    return Vocabulary(
        "{colour_article} {colour} {shape} on {background_article} {background} background",
        {
            "colour": tuple(shapes.COLOURS),
            "shape": shapes.SHAPES,
            "background": shapes.BACKGROUNDS,
        },
        (("colour", "background"),),
    )


def load_vocabulary(path: str | Path) -> Vocabulary:
    """A JSON or YAML file: `{template: ..., slots: {name: [words]}, distinct: [[a, b]]}`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise VocabularyError(f"{path}: cannot read the vocabulary: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("template"), str):
        raise VocabularyError(f"{path}: expected a mapping with a `template` string")
    slots = doc.get("slots")
    if not isinstance(slots, dict) or not slots:
        raise VocabularyError(f"{path}: `slots` must map slot names to lists of words")
    for name, words in slots.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise VocabularyError(f"{path}: slots.{name} must be a non-empty list of words")
    distinct = tuple(tuple(p) for p in doc.get("distinct", []))
    if any(len(p) != 2 or not set(p) <= set(slots) for p in distinct):
        raise VocabularyError(f"{path}: `distinct` must list pairs of slot names")
    vocab = Vocabulary(doc["template"], {k: tuple(v) for k, v in slots.items()}, distinct)  # type: ignore[arg-type]
    try:
        vocab.sentence(vocab.combos()[0])
    except (KeyError, IndexError) as err:
        raise VocabularyError(
            f"{path}: the template uses an unknown slot or no combo is left: {err}"
        ) from err
    return vocab


@dataclass(frozen=True)
class Tag:
    caption: str
    confidence: float
    values: dict[str, str] = field(default_factory=dict)


class ZeroShotTagger:
    def __init__(self, bundle: ClipBundle, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.combos = vocabulary.combos()
        self.sentences = [vocabulary.sentence(c) for c in self.combos]
        result = encode_texts(bundle, self.sentences)
        if len(result.chunks) != len(self.sentences):
            raise VocabularyError("a vocabulary sentence does not fit CLIP's context in one chunk")
        self.text_vectors = result.vectors  # [m, d], unit length
        scale = getattr(bundle.model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.clip_version = bundle.model_version
        self.version = f"tagger-v1:{bundle.model_version}:{vocabulary.version}"
        self.embed_dim = bundle.embed_dim

    def tag(self, image_vectors: np.ndarray) -> list[Tag]:
        x = np.asarray(image_vectors, np.float32)
        if len(x) == 0:
            return []
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        logits = self.logit_scale * (x @ self.text_vectors.T)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [
            Tag(self.sentences[j], float(probs[i, j]), dict(self.combos[j]))
            for i, j in enumerate(best)
        ]

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "candidates": len(self.sentences)}
