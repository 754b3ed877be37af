"""The bundle manifest: what a bundle holds, where it came from, and the checksum of
every file in it. A reader verifies the manifest before using a single byte of a bundle.

Layout of a bundle folder (paths in the manifest are relative, POSIX style)::

    manifest.json                      written last: a bundle without it is incomplete
    clip/image_tower.ts                TorchScript, L2-normalised image vectors
    clip/text_tower.ts                 TorchScript, L2-normalised text vectors
    clip/open_clip_model.safetensors   the same weights, for any other runtime
    clip/config.json                   architecture, preprocess and tokenizer settings
    clip/bpe_simple_vocab_16e6.txt.gz  the tokenizer vocabulary (no open_clip download)
    projector/audio_head.ts            the unified-space head for Whisper vectors
    projector/projector.safetensors    + projector.json (its config and version)
    diffusion/pipeline/...             the base pipeline with the LoRA fused in (diffusers)
    diffusion/lora/pytorch_lora_weights.safetensors   the adapter itself (diffusers format)
    verify/reference.safetensors       fixed inputs + the training-side outputs on them
    verify/reference.json              the text / prompt inputs of the same check
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "mm-serving-bundle/1"


class BundleIntegrityError(RuntimeError):
    """A bundle that must not be served: incomplete, or a file does not match the manifest."""


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(bundle_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every file of the folder except the manifest."""
    root = Path(bundle_dir)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json (via a temporary name, so a reader never sees half of it)."""
    path = Path(bundle_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleIntegrityError(f"{bundle_dir}: no {MANIFEST} (an incomplete bundle)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise BundleIntegrityError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise BundleIntegrityError(f"{path}: format {manifest.get('format')!r}, want {FORMAT!r}")
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file against the manifest (size, then sha256); return the manifest.

    Raises BundleIntegrityError naming the first file that is missing or differs.
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    for rel, meta in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise BundleIntegrityError(f"{rel}: listed in the manifest but missing from {root}")
        size = path.stat().st_size
        if size != meta["size"]:
            raise BundleIntegrityError(
                f"{rel}: size {size} bytes, the manifest says {meta['size']} (corrupted?)"
            )
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise BundleIntegrityError(
                f"{rel}: sha256 {digest[:16]}..., the manifest says {meta['sha256'][:16]}... "
                "(corrupted or modified)"
            )
    return manifest
