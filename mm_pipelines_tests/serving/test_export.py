"""Export: the bundle reproduces the training-side models in a fresh process, records
what it holds, refuses corruption, and fails when a model is off its bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mm_pipelines.pipeline.sample_data import SPEECH_DIR
from mm_pipelines.serving.manifest import BundleIntegrityError, verify_bundle
from mm_pipelines_tests.serving.conftest import child_env, export, png_bytes

TEXTS = ["a red circle on a blue background", "green square", "word " * 60]
TRAINING_MODULES = (
    "mm_pipelines.models.demo.tiny_clip",
    "mm_pipelines.models.unified.projector",
    "mm_pipelines.models.diffusion.pipeline",
    "mm_pipelines.models.diffusion.lora",
    "mm_pipelines.pipeline.search",
)

FRESH_PROCESS = """
import json, sys
from pathlib import Path
from mm_pipelines.serving.runtime import ServingModels
bundle, images, audio = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
m = ServingModels.load(bundle, diffusion=False)
out = {
    "text": [m.embed_text(t).tolist() for t in json.loads(sys.argv[4])],
    "image": [m.embed_image(Path(p).read_bytes()).tolist() for p in images],
    "audio": m.embed_audio(Path(audio).read_bytes()).tolist(),
    "modules": sorted(k for k in sys.modules if k.startswith("mm_pipelines")),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def query_files(tmp_path_factory) -> dict[str, list[str] | str]:
    root = tmp_path_factory.mktemp("queries")
    images = []
    for i, (w, h) in enumerate(((64, 48), (32, 32), (300, 200))):
        path = root / f"img{i}.png"
        path.write_bytes(png_bytes(w, h, (40 * i, 200, 30)))
        images.append(str(path))
    audio = root / "clip_01.ogg"
    audio.write_bytes((SPEECH_DIR / "clip_01.ogg").read_bytes())
    return {"images": images, "audio": str(audio)}


@pytest.fixture(scope="module")
def fresh_process_output(bundle_a, query_files) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(bundle_a.bundle_dir),
            json.dumps(query_files["images"]),
            query_files["audio"],
            json.dumps(TEXTS),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_vectors_match_training_side_within_recorded_bound(
    bundle_a, model_sets, query_files, fresh_process_output
):
    from mm_pipelines.pipeline.search import QueryModels, embed_query

    src = model_sets["a"]
    training = QueryModels.load("mm-tiny-clip", str(src.clip_checkpoint), src.projector_dir)
    checks = bundle_a.manifest["verification"]["checks"]
    for kind, queries in (
        ("text", TEXTS),
        ("image", [Path(p) for p in query_files["images"]]),
        ("audio", [Path(query_files["audio"])]),
    ):
        want = np.stack([embed_query(training, q) for q in queries])
        got = np.asarray(fresh_process_output[kind], np.float32).reshape(want.shape)
        bound = checks["projector_audio" if kind == "audio" else f"clip_{kind}"]["bound"]
        assert np.abs(got - want).max() <= bound, kind


def test_runtime_needs_no_training_code(fresh_process_output):
    loaded = set(fresh_process_output["modules"])
    assert "mm_pipelines.serving.runtime" in loaded
    assert not loaded & set(TRAINING_MODULES)


def test_manifest_records_models_checks_and_every_file(bundle_a):
    m = bundle_a.manifest
    assert m["bundle_version"] == "bundle-a" and m["dagster_run_id"] == "dagster-run-a"
    assert m["source_hashes"] == {
        "clip_training_set": "sha256:abc",
        "lora_training_set": "sha256:def",
    }
    clip = m["models"]["clip"]
    assert clip["registered_version"] == "3" and clip["mlflow_run_id"] == "r1"
    assert clip["format"] == "torchscript" and clip["version"].startswith("mm-tiny-clip@sha256:")
    assert m["models"]["diffusion"]["fused"] is True
    assert m["models"]["whisper"]["referenced"] is True
    assert set(m["verification"]["checks"]) == {
        "clip_text",
        "clip_image",
        "projector_audio",
        "diffusion",
    }
    for check in m["verification"]["checks"].values():
        assert 0 <= check["max_abs_diff"] <= check["bound"]
    on_disk = {
        p.relative_to(bundle_a.bundle_dir).as_posix()
        for p in bundle_a.bundle_dir.rglob("*")
        if p.is_file()
    }
    assert set(m["files"]) == on_disk - {"manifest.json"}
    assert "diffusion/lora/pytorch_lora_weights.safetensors" in m["files"]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"].values())


def test_fused_pipeline_generates_what_base_plus_adapter_generates(bundle_a, model_sets):
    """The bundle's plain diffusers pipeline (LoRA fused) = base + adapter, unfused."""
    from mm_pipelines.models.diffusion.generate import generate_images
    from mm_pipelines.models.diffusion.lora import load_adapter
    from mm_pipelines.models.diffusion.pipeline import load_pipeline
    from mm_pipelines.serving.runtime import ServingModels

    src = model_sets["a"]
    pipe = load_adapter(load_pipeline(src.diffusion_base_dir), src.lora_adapter_dir)
    want = np.asarray(generate_images(pipe, ["a red circle"], [7], num_inference_steps=3)[0].image)
    served = ServingModels.load(bundle_a.bundle_dir, audio=False)
    from io import BytesIO

    from PIL import Image

    got = np.asarray(Image.open(BytesIO(served.generate("a red circle", 7, steps=3))))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding


def test_corrupted_file_is_refused_naming_the_file(bundle_a, tmp_path):
    from mm_pipelines.serving.runtime import ServingModels

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_a.bundle_dir, copy)
    target = copy / "clip" / "text_tower.ts"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    target.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="clip/text_tower.ts"):
        verify_bundle(copy)
    with pytest.raises(BundleIntegrityError, match="clip/text_tower.ts"):
        ServingModels.load(copy, audio=False, diffusion=False)
    (copy / "projector" / "projector.json").unlink()
    target.write_bytes(bundle_a.bundle_dir.joinpath("clip", "text_tower.ts").read_bytes())
    with pytest.raises(BundleIntegrityError, match="projector/projector.json: .* missing"):
        verify_bundle(copy)


def test_export_over_its_bound_fails_and_leaves_no_manifest(model_sets, tmp_path):
    from mm_pipelines.serving.export import ExportVerificationError

    with pytest.raises(ExportVerificationError, match="clip_text"):
        export(model_sets["b"], tmp_path / "bundle", include_audio=False, bounds={"clip_text": -1})
    assert not (tmp_path / "bundle" / "manifest.json").exists()
