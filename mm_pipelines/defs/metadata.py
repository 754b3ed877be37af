"""Small inline previews for the Dagster UI (markdown with base64 data-URI images)."""

from __future__ import annotations

import base64
import io

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
