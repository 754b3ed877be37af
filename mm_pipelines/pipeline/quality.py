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
from mm_pipelines.pipeline import review_logging as review
from mm_pipelines.pipeline.generation import generate_for_subject
from mm_pipelines.pipeline.lora import adapter_record, load_training_set
from mm_pipelines.pipeline.quality_logging import SIDES, log_evaluation
from mm_pipelines.pipeline.review_images import Labelled, comparison_sheet
from mm_pipelines.pipeline.services import Services
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage import generated
from mm_pipelines.storage.postgres import connect

REPORT_FILE = "quality.json"
BOOTSTRAP_SEED = 0


@dataclass
class QualityResult:
    report: dict[str, Any]
    flat: dict[str, float]  # adapter_* / base_* numbers (sample sizes too) and the ratios
    run_url: str  # the evaluation's parent run
    compare_url: str  # MLflow's compare view of its base and adapter child runs
    comparison_url: str  # the labelled base | adapter sheet, served by the MLflow UI
    comparison_png: bytes  # base | adapter per (prompt, seed), labelled, enlarged
    preview_png: bytes  # base over adapter at their own size (the first pairs inline)


def evaluate_subject(svc: Services, subject_name: str, run: RunSpec) -> QualityResult:
    """Score the current adapter's catalogued generations and the base model's on the same
    prompts and seeds, with bootstrap intervals and sample sizes; log one MLflow parent run
    with a child run per model (same metric names), link it to the adapter's run and
    registered version, and store the report."""
    from mm_pipelines.models.diffusion.bootstrap import image_evidence
    from mm_pipelines.models.diffusion.evaluation import clip_features, quality_report
    from mm_pipelines.models.diffusion.metrics import inception_feature_extractor

    subject = subjects.get_subject(subject_name)
    record = adapter_record(svc, subject.name)
    ts = load_training_set(svc, subject.name)
    adapted, hashes = _catalogued(svc, subject.name, record.adapter_version)
    base_pipe = svc.load_base_pipeline(Path(record.base_model_dir))
    base = review.labelled(generate_for_subject(base_pipe, subject))
    adapted, base = _paired(adapted, base)
    bundle = svc.load_clip()
    weights = svc.choice.fid_inception_weights
    feature = inception_feature_extractor(weights) if weights else clip_features(bundle)
    device = svc.compute.torch_device()
    adapted_images, base_images = [a.image for a in adapted], [b.image for b in base]
    report = quality_report(
        ts.images, adapted_images, base_images, subject.score_prompt, bundle, feature, device=device
    )
    gates = subject.gates
    evidence = image_evidence(
        ts.images,
        adapted_images,
        base_images,
        subject.score_prompt,
        bundle,
        feature,
        resamples=gates.bootstrap_resamples,
        confidence=gates.confidence,
        seed=BOOTSTRAP_SEED,
        device=device,
    )
    report.update(
        subject=subject.name,
        adapter_version=record.adapter_version,
        registered_model=record.registered_model,
        registered_version=record.registered_version,
        adapter_run_id=record.mlflow_run_id,
        sample_sizes={"n_real": len(ts.images), "n_generated": len(adapted)},
        intervals={k: v.as_dict() for k, v in evidence.intervals.items()},
        bootstrap={
            "resamples": gates.bootstrap_resamples,
            "confidence": gates.confidence,
            "seed": BOOTSTRAP_SEED,
            "method": "percentile; references and (prompt, seed) pairs resampled",
        },
    )
    flat = {
        f"{side}_{k}": float(v)
        for side in SIDES
        for k, v in report[side].items()
        if isinstance(v, (int, float))
    }
    flat.update({k: float(report[k]) for k in ("fid_ratio_to_base", "kid_ratio_to_base")})
    logged = log_evaluation(
        svc, run, subject, record, ts, report, evidence, (base, adapted), hashes
    )
    report["quality_run_id"] = logged.parent_run_id
    store = svc.need_models()
    with store.staging("quality") as work:
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        store.put(ms.QUALITY_REPORT, subject.name, work, make_current=True)
    return QualityResult(
        report,
        flat,
        logged.run_url,
        logged.compare_url,
        logged.comparison_url,
        encode_image(comparison_sheet(base, adapted), "png"),
        encode_image(_preview(base, adapted), "png"),
    )


def _catalogued(
    svc: Services, subject: str, adapter_version: str
) -> tuple[list[Labelled], dict[tuple[str, int], str]]:
    """The adapter's catalogued generations (labelled) and their content hashes."""
    media = svc.need_media()
    with connect(svc.need_dsn()) as conn:
        rows = generated.generated_images(conn, subject, adapter_version)
    if not rows:
        raise ValueError(f"no generated images of adapter {adapter_version}")
    images, hashes = [], {}
    for r in rows:
        with Image.open(io.BytesIO(media.read_bytes(r["content_hash"]))) as im:
            images.append(Labelled(im.convert("RGB"), r["prompt"], int(r["seed"])))
        hashes[(r["prompt"], int(r["seed"]))] = r["content_hash"]
    return images, hashes


def _paired(adapted: list[Labelled], base: list[Labelled]) -> tuple[list[Labelled], list[Labelled]]:
    """Both sides in the same (prompt, seed) order, only pairs present on both."""
    by_key = {(b.prompt, b.seed): b for b in base}
    keys = sorted((a.prompt, a.seed) for a in adapted if (a.prompt, a.seed) in by_key)
    if not keys:
        raise ValueError("the adapter's generations share no (prompt, seed) with the subject's")
    by_adapted = {(a.prompt, a.seed): a for a in adapted}
    return [by_adapted[k] for k in keys], [by_key[k] for k in keys]


def _preview(base: list[Labelled], adapted: list[Labelled], pairs: int = 4) -> Image.Image:
    """base over adapter for the first pairs, at the generated size."""
    return image_grid([b.image for b in base[:pairs]] + [a.image for a in adapted[:pairs]], pairs)


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
    intervals: dict[str, Any]  # every number with its interval and sample sizes
    sample_sizes: dict[str, int]
    version_url: str  # the registered version's page in MLflow

    @property
    def passed(self) -> bool:
        return not self.failures


def apply_gates(svc: Services, subject_name: str) -> GateResult:
    """Check the subject's latest quality report against its gates and record the decision
    on the registered version (tag, reasons, `candidate` alias)."""
    from mm_pipelines.models.diffusion.gates import gate_failures, sample_sizes

    subject = subjects.get_subject(subject_name)
    report = quality_report_of(svc, subject.name)
    failures = gate_failures(report, subject.gates)
    name, version = report["registered_model"], str(report["registered_version"])
    tracker = svc.need_tracker()
    registry.apply_gate(tracker.client(), name, version, failures)
    return GateResult(
        failures,
        dataclasses.asdict(subject.gates),
        name,
        version,
        report["fid_ratio_to_base"],
        report.get("intervals", {}),
        sample_sizes(report),
        tracker.model_version_url(name, version),
    )
