"""Small inline previews for the Dagster UI (markdown with base64 data-URI images)."""

from __future__ import annotations

import base64
import io
from typing import Any

import dagster as dg
from PIL import Image


def thumbnail_data_uri(data: bytes, max_px: int = 96) -> str:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        img.thumbnail((max_px, max_px))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def markdown_gallery(items: list[tuple[str, bytes]], max_px: int = 96) -> str:
    """`items` are (label, image bytes); unreadable images are left out."""
    cells = []
    for label, data in items:
        try:
            cells.append(f"![{label}]({thumbnail_data_uri(data, max_px)})")
        except OSError:
            continue
    return " ".join(cells)


def png_markdown(title: str, png: bytes, alt: str = "image") -> str:
    """Markdown with one inline image (a data URI: the UI shows it, nothing to fetch)."""
    return f"{title}\n\n![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


# Dagster's asset page renders a markdown entry in place only when it is shorter than
# 1000 characters (longer ones hide behind "[Show Markdown]")
INLINE_MARKDOWN_CHARS = 1000


def inline_markdown(png: bytes, alt: str, budget: int = INLINE_MARKDOWN_CHARS - 10) -> str | None:
    """Markdown of one image short enough for Dagster to show without a click: the image
    at its own size with as many palette colours as fit; if it cannot fit, its leading
    part (a grid's first images), then smaller. None when nothing fits."""
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGB")
    crops = [img.crop((0, 0, max(1, img.width // k), img.height)) for k in (1, 2, 4, 8)]
    halved = [c.resize((max(1, c.width // 2), max(1, c.height // 2))) for c in crops[:2]]
    for candidate in (*crops, *halved):
        for colours in (64, 32, 16):
            buf = io.BytesIO()
            candidate.quantize(colours).save(buf, format="PNG", optimize=True)
            text = f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
            if len(text) <= budget:
                return text
    return None


def served_image(alt: str, url: str) -> Any:
    """An image the MLflow UI serves (`mm mlflow`), drawn inline by Dagster (a short URL,
    so under its limit); while MLflow is not running the UI shows `alt` instead."""
    return dg.MetadataValue.md(f"![{alt}]({url})")


def previews(name: str, small_png: bytes, full_png: bytes | None = None) -> dict[str, Any]:
    """`<name>_preview`: shown on the asset page without a click when it fits Dagster's
    inline limit; `<name>`: the full image (Dagster hides it behind "[Show Markdown]")."""
    full = full_png or small_png
    entries: dict[str, Any] = {name: dg.MetadataValue.md(png_markdown(name, full, name))}
    inline = inline_markdown(small_png, name)
    if inline is not None:
        entries[f"{name}_preview"] = dg.MetadataValue.md(inline)
    return entries


def interval_table(intervals: dict[str, Any]) -> dict[str, str]:
    """Each quality number as `estimate [low, high] (90% CI, n_real=5, n_generated=16)`."""
    out = {}
    for key, iv in intervals.items():
        sizes = ", ".join(f"{k}={v}" for k, v in iv["n"].items())
        out[key] = (
            f"{iv['estimate']:.4g} [{iv['low']:.4g}, {iv['high']:.4g}] "
            f"({iv['confidence']:.0%} CI, {sizes})"
        )
    return out
