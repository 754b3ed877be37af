"""An image-to-text captioner from a transformers model directory (BLIP, GIT, Florence-2,
a ViT+GPT-2 VisionEncoderDecoder, ...), on the compute device.

Confidence is the geometric mean of the chosen tokens' probabilities (exp of the mean
log-probability of the generated tokens), the number kohya-style captioning scripts call
the caption's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm_pipelines.models.common import resolve_device, weights_version


class CaptionerLoadError(ValueError):
    pass


class ImageCaptioner:
    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        max_new_tokens: int = 30,
        prompt: str | None = None,  # e.g. "<CAPTION>" for Florence-2
    ) -> None:
        from transformers import AutoModelForImageTextToText

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CaptionerLoadError(f"{self.model_dir}: no such captioner model directory")
        try:
            self.version = weights_version(self.model_dir, "captioner")
            self.model = AutoModelForImageTextToText.from_pretrained(str(self.model_dir))
            self.image_processor, self.tokenizer, self.processor = _processors(self.model_dir)
        except (OSError, ValueError, KeyError) as err:
            raise CaptionerLoadError(
                f"{self.model_dir}: not a usable image-to-text model: {err}"
            ) from err
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def _inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        rgb = [im.convert("RGB") for im in images]
        if self.processor is not None:
            kwargs: dict[str, Any] = {"images": rgb, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(rgb)
            inputs = dict(self.processor(**kwargs))
        else:
            inputs = dict(self.image_processor(images=rgb, return_tensors="pt"))
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    def caption(self, images: Sequence[Image.Image]) -> list[tuple[str, float]]:
        """(caption, confidence) per image."""
        if not images:
            return []
        with torch.inference_mode():
            out = self.model.generate(
                **self._inputs(images),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_scores=True,
                return_dict_in_generate=True,
            )
            scores = self.model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            )
        generated = out.sequences[:, -scores.shape[1] :]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        special = set(self.tokenizer.all_special_ids)
        result = []
        for row, text in enumerate(texts):
            keep = [
                float(s)
                for s, t in zip(scores[row].tolist(), generated[row].tolist(), strict=True)
                if t not in special and np.isfinite(s)
            ]
            confidence = float(np.exp(np.mean(keep))) if keep else 0.0
            result.append((text.strip(), confidence))
        return result


def _processors(model_dir: Path) -> tuple[Any, Any, Any]:
    """(image processor, tokenizer, combined processor or None). AutoProcessor gives both
    for BLIP/GIT/Florence-2; a VisionEncoderDecoder folder has them as separate files."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError):
        proc = None
    if proc is not None and hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
        return proc.image_processor, proc.tokenizer, proc
    return (
        AutoImageProcessor.from_pretrained(str(model_dir)),
        AutoTokenizer.from_pretrained(str(model_dir)),
        None,
    )
