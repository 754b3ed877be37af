"""A subject's quality: CLIP score, FID and KID of the adapter's generations against the
subject's images, next to the base model's on the same prompts and seeds; and the gates
that decide whether the registered version becomes a serving candidate."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mm_pipelines.models.common import encode_image, image_grid
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry, subjects
from mm_pipelines.pipeline.generation import generate_for_subject
from mm_pipelines.pipeline.lora import adapter_record, load_training_set
from mm_pipelines.pipeline.services import Services
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage import generated
from mm_pipelines.storage.postgres import connect

REPORT_FILE = "quality.json"


@dataclass
class QualityResult:
    report: dict[str, Any]
    flat: dict[str, float]  # adapter_* / base_* metrics and the ratios
    run_url: str
    base_png: bytes
    adapter_png: bytes


def evaluate_subject(svc: Services, subject_name: str, run: RunSpec) -> QualityResult:
    """Score the current adapter's catalogued generations and the base model's on the same
    prompts and seeds; log to MLflow (also onto the adapter's run) and store the report."""
    from mm_pipelines.models.diffusion.evaluation import clip_features, quality_report
    from mm_pipelines.models.diffusion.metrics import inception_feature_extractor

    subject = subjects.get_subject(subject_name)
    record = adapter_record(svc, subject.name)
    references = load_training_set(svc, subject.name).images
    media = svc.need_media()
    with connect(svc.need_dsn()) as conn:
        rows = generated.generated_images(conn, subject.name, record.adapter_version)
    if not rows:
        raise ValueError(f"no generated images of adapter {record.adapter_version}")
    adapted = []
    for r in rows:
        with Image.open(io.BytesIO(media.read_bytes(r["content_hash"]))) as im:
            adapted.append(im.convert("RGB"))
    base_pipe = svc.load_base_pipeline(Path(record.base_model_dir))
    base = [g.image for g in generate_for_subject(base_pipe, subject)]
    bundle = svc.load_clip()
    weights = svc.choice.fid_inception_weights
    feature = inception_feature_extractor(weights) if weights else clip_features(bundle)
    report = quality_report(
        references,
        adapted,
        base,
        subject.score_prompt,
        bundle,
        feature,
        device=svc.compute.torch_device(),
    )
    report.update(
        subject=subject.name,
        adapter_version=record.adapter_version,
        registered_model=record.registered_model,
        registered_version=record.registered_version,
        adapter_run_id=record.mlflow_run_id,
    )
    flat = {
        f"{side}_{k}": float(v)
        for side in ("adapter", "base")
        for k, v in report[side].items()
        if isinstance(v, (int, float))
    }
    flat.update({k: float(report[k]) for k in ("fid_ratio_to_base", "kid_ratio_to_base")})
    spec = run.with_tags(subject=subject.name, adapter_run_id=str(record.mlflow_run_id))
    with svc.need_tracker().run(spec) as tracked:
        tracked.metrics(flat)
        tracked.json(report, "quality_report.json")
        tracked.image(image_grid(adapted), "samples/adapter.png")
        tracked.image(image_grid(base), "samples/base.png")
    client = svc.need_tracker().client()
    for k, v in flat.items():  # the adapter's own run carries its quality too
        client.log_metric(record.mlflow_run_id, f"quality_{k}", v)
    store = svc.need_models()
    with store.staging("quality") as work:
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        store.put(ms.QUALITY_REPORT, subject.name, work, make_current=True)
    return QualityResult(
        report,
        flat,
        tracked.url,
        encode_image(image_grid(base), "png"),
        encode_image(image_grid(adapted), "png"),
    )


def quality_report_of(svc: Services, subject_name: str) -> dict[str, Any]:
    try:
        artifact = svc.need_models().get(ms.QUALITY_REPORT, subject_name)
    except ms.ArtifactNotFound as err:
        raise FileNotFoundError(f"{err}: materialize generation_quality first") from err
    return json.loads((artifact.path / REPORT_FILE).read_text())


@dataclass
class GateResult:
    failures: list[str]
    gates: dict[str, Any]
    model: str
    version: str
    fid_ratio_to_base: float

    @property
    def passed(self) -> bool:
        return not self.failures


def apply_gates(svc: Services, subject_name: str) -> GateResult:
    """Check the subject's latest quality report against its gates and record the decision
    on the registered version (tag, reasons, `candidate` alias)."""
    from mm_pipelines.models.diffusion.evaluation import gate_failures

    subject = subjects.get_subject(subject_name)
    report = quality_report_of(svc, subject.name)
    failures = gate_failures(report, subject.gates)
    name, version = report["registered_model"], str(report["registered_version"])
    registry.apply_gate(svc.need_tracker().client(), name, version, failures)
    return GateResult(
        failures, dataclasses.asdict(subject.gates), name, version, report["fid_ratio_to_base"]
    )
