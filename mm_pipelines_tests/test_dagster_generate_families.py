"""The subject pipeline on SDXL and FLUX.1 bases: the user changes nothing but the base
model directory (MM_DIFFUSION_BASE, here the `models` resource's `diffusion_base`).

Training set -> adapter -> generations -> quality -> gates (the `subject_pipeline` job),
then `online_model` exports the approved adapter (fused into the base, verified in a
fresh process) and the published bundle generates through the serving runtime.

Shared, session-scoped: the tiny family bases (`family_base_dir`: the SD base's VAE, the
family's denoiser trained 200 steps) and the demo CLIP (`demo_clip`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pytest
import torch
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import ModelsResource, ServingResource
from mm_pipelines.defs.serve.assets import online_model
from mm_pipelines.models.diffusion.generate import generate_images
from mm_pipelines.models.diffusion.lora import load_adapter
from mm_pipelines.models.diffusion.pipeline import load_pipeline
from mm_pipelines.pipeline import lora, subjects
from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines.serving.runtime import ServingModels
from mm_pipelines.serving.store import open_store
from mm_pipelines_tests.conftest import new_database
from mm_pipelines_tests.models.conftest_diffusion import torch_threads
from mm_pipelines_tests.test_dagster_generate import Env, checks, meta

SUBJECT = subjects.DEMO_SUBJECT["name"]
SUBJECT_PROMPT = subjects.DEMO_SUBJECT["instance_prompt"]
FAMILIES = ["sdxl", "flux"]
# the LoRA settings of the model-level family tests; FLUX has no DDPM noise offset/Min-SNR
LORA = {
    "sdxl": {"noise_offset": 0.1, "snr_gamma": 5.0},
    "flux": {},
}


def _subject(family: str) -> dict:
    raw = copy.deepcopy(subjects.DEMO_SUBJECT)
    raw["lora"] = {
        "rank": 4,
        "alpha": 8,
        "learning_rate": 0.01,
        "steps": 100,
        "batch_size": 4,
        **LORA[family],
    }
    return raw


def _projector(root: Path, clip_checkpoint: Path) -> Path:
    """A unified projector for the demo CLIP and the shipped Whisper (random head: the
    export only needs one that matches both model versions)."""
    from mm_pipelines.models.clip.loading import load_clip
    from mm_pipelines.models.speech.audio_encoder import load_whisper_encoder
    from mm_pipelines.models.unified.projector import (
        AudioHead,
        ProjectorConfig,
        UnifiedProjector,
        save_projector,
    )

    clip = load_clip(checkpoint=clip_checkpoint)
    whisper = load_whisper_encoder(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = AudioHead(whisper.dim, 64, clip.embed_dim)
    config = ProjectorConfig(
        whisper.dim, clip.embed_dim, 64, clip.model_version, whisper.model_version
    )
    save_projector(UnifiedProjector(config, head), root / "projector")
    return root / "projector"


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, pg_server_dsn, demo_clip, family_base_dir):
    family = request.param
    root = tmp_path_factory.mktemp(f"generate_{family}")
    base = family_base_dir(family)
    env = Env(root, new_database(pg_server_dsn), demo_clip.checkpoint_path, base)
    models = ModelsResource(
        models_dir=str(root / "models"),
        clip_checkpoint=str(demo_clip.checkpoint_path),
        diffusion_base=str(base),
        projector_dir=str(_projector(root, demo_clip.checkpoint_path)),
    )
    serving = ServingResource(location=str(root / "serving"), s3=S3Resource())
    export_resources = {**env.resources, "models": models, "serving": serving}
    mp = pytest.MonkeyPatch()
    mp.setenv("MM_SUBJECTS", str(env.subjects_file))
    write_sample_batch(root / "landing", "b1")
    env.declare(_subject(family))
    with dg.instance_for_test() as instance, torch_threads(1):
        instance.add_dynamic_partitions(batch_partitions.name, ["b1"])
        assert dg.materialize(
            [raw_media], partition_key="b1", instance=instance, resources=env.resources
        ).success
        subject = env.run(instance, SUBJECT)
        export = dg.materialize([online_model], instance=instance, resources=export_resources)
        yield SimpleNamespace(family=family, env=env, subject=subject, export=export, base=base)
    mp.undo()


def test_the_subject_pipeline_passes_its_gates_on_the_family_base(family_run) -> None:
    result = family_run.subject
    assert result.success
    assert checks(result) == {"enough_images": True, "quality_gates": True}
    assert meta(result, "lora_training_set")["images"] == 5
    quality = meta(result, "generation_quality")
    assert quality["adapter_fid"] < 0.9 * quality["base_fid"], quality
    assert quality["adapter_n_fake"] == 16
    record = lora.adapter_record(family_run.env.models.services(), SUBJECT)
    assert record.base_model_version.startswith(f"{family_run.family}-")


def test_the_exported_bundle_is_fused_verified_and_serves_the_adapter(family_run) -> None:
    assert family_run.export.success
    info = meta(family_run.export, "online_model")
    assert info["max_abs_diff"]["diffusion"] <= 1e-3  # fused bundle vs unfused adapter
    store = open_store(family_run.env.root / "serving")
    bundle = store.local_bundle_dir(info["bundle_version"])
    served = ServingModels.load(bundle, audio=False)
    diffusion = served.manifest["models"]["diffusion"]
    assert diffusion["fused"] and diffusion["family"] == family_run.family
    # the served image is what the training side draws: base + adapter, same seed
    record = lora.adapter_record(family_run.env.models.services(), SUBJECT)
    pipe = load_adapter(load_pipeline(record.base_model_dir), record.adapter_dir)
    (reference,) = generate_images(
        pipe, [SUBJECT_PROMPT], [7], num_inference_steps=10, guidance_scale=3.0
    )
    got = served.generate_array(SUBJECT_PROMPT, 7, 10, 3.0)
    want = np.asarray(reference.image, np.float32) / 255.0
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2 / 255  # fused vs unfused, then 8-bit rounding
