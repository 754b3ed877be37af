"""A subject's LoRA workflow up to the adapter: the diffusion base model, the subject's
training set (from the catalog) and its adapter.

Every artifact one step hands the next goes through the model store: the base model, the
training set, the adapter (with its lineage as metadata) and the LoRA checkpoints, so a
retry on another machine resumes where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mm_pipelines.models.common import encode_image, image_grid, weights_version
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry, subjects
from mm_pipelines.pipeline import review_logging as review
from mm_pipelines.pipeline.curate import selection as curate_selection
from mm_pipelines.pipeline.progress import Eta
from mm_pipelines.pipeline.services import DEMO, Services
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage import generated
from mm_pipelines.storage.postgres import connect

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- base model


@dataclass
class BaseModelResult:
    model_version: str
    trained_here: bool
    images: int = 0
    final_unet_loss: float | None = None
    train_seconds: float | None = None
    registered_version: str | None = None
    run_url: str | None = None


def build_base_model(
    svc: Services,
    run: RunSpec,
    vae_steps: int = 500,
    unet_steps: int = 300,
    seed: int = 0,
    log: Log = _quiet,
) -> BaseModelResult:
    """MM_DIFFUSION_BASE (checked to load), or the demo's tiny pipeline trained on the
    catalog's captioned images, tracked, published to the model store and registered."""
    from mm_pipelines.models.demo.tiny_diffusion import BaseTrainConfig, train_base_pipeline
    from mm_pipelines.models.diffusion.pipeline import base_dir_version

    if svc.choice.diffusion_base:
        svc.load_base_pipeline()
        return BaseModelResult(base_dir_version(svc.choice.diffusion_base), False)
    with connect(svc.need_dsn()) as conn:
        rows = [r for r in generated.select_images(conn, limit=10_000) if r.caption]
    if not rows:
        raise ValueError("no captioned images in the catalog: ingest a batch (raw_media) first")
    images, captions = [], []
    for row in rows:
        with Image.open(io.BytesIO(svc.need_media().read_bytes(row.content_hash))) as im:
            image = im.convert("RGB")
        # mirrored copies double a small set; shapes and colours read the same mirrored
        images += [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        captions += [row.caption, row.caption]
    cfg = BaseTrainConfig(vae_steps=vae_steps, unet_steps=unet_steps, seed=seed)
    store = svc.need_models()
    tracker = svc.need_tracker()
    with store.staging("diffusion-base") as work, tracker.run(run, system_metrics=True) as tracked:
        tracked.params({**dataclasses.asdict(cfg), "images": len(rows)})

        def progress(name: str, what: str, total: int) -> Callable[[int, float], None]:
            eta = Eta(f"diffusion base {what} training, step", total, log)

            def report(step: int, loss: float) -> None:
                tracked.step(name, loss, step)
                eta(step, f"loss {loss:.4f}")  # steps count from 1

            return report

        result = train_base_pipeline(
            images,
            captions,
            train_config=cfg,
            device=svc.compute.torch_device(),
            output_dir=work,
            progress=progress("unet_loss", "UNet", cfg.unet_steps),
            vae_progress=progress("vae_loss", "VAE", cfg.vae_steps),
        )
        version = weights_version(work, "sd")
        tracked.metrics({"train_seconds": result.seconds})
        published = tracked.publish(
            store,
            ms.DIFFUSION_BASE,
            DEMO,
            work,
            registered_name=registry.DIFFUSION_BASE_MODEL,
            version=version,
            tags={"model_version": version},
            artifact_path="pipeline",
        )
    return BaseModelResult(
        version,
        True,
        len(rows),
        result.unet_losses[-1],
        round(result.seconds, 1),
        published.registered_version,
        tracked.url,
    )


def base_model_version(svc: Services) -> tuple[Path, str, str | None]:
    """(local folder, model version, store version or None for an external base)."""
    from mm_pipelines.models.diffusion.pipeline import base_dir_version

    if svc.choice.diffusion_base:
        path = Path(svc.choice.diffusion_base)
        return path, base_dir_version(path), None
    artifact = svc.need_models().get(ms.DIFFUSION_BASE, DEMO)
    return artifact.path, artifact.version, artifact.version


# --------------------------------------------------------------------------- training set


@dataclass
class TrainingSetResult:
    version: str
    images: int
    resolution: int
    subject_fingerprint: str
    skipped: list[tuple[str, str]]
    thumbnails: list[tuple[str, bytes]]  # (label, PNG)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # curation: (hash, why)
    caption_sources: dict[str, int] = field(default_factory=dict)  # manifest/model/none


def build_training_set(svc: Services, subject_name: str) -> TrainingSetResult:
    """The subject's images selected from the catalog, cropped to the base model's
    resolution, stored as the subject's current training set."""
    from mm_pipelines.models.diffusion.pipeline import pipeline_dir_resolution
    from mm_pipelines.models.diffusion.training_set import (
        build_training_set as build,
    )
    from mm_pipelines.models.diffusion.training_set import save_training_set

    subject = subjects.get_subject(subject_name)
    sel = subject.select
    with connect(svc.need_dsn()) as conn:
        rows = generated.select_images(
            conn,
            batches=sel.batches,
            tenant=sel.tenant,
            caption_contains=sel.caption_contains,
            content_hashes=sel.content_hashes,
            limit=10_000,  # curated first, then ranked or cut to the limit
        )
        # --- curation (pipeline/curate/selection.py): no flagged items, no two
        # near-duplicates, the subject's minimum aesthetic score
        curated = curate_selection.curate_selection(conn, rows, subject.min_aesthetic)
        rows = curated.kept
        if sel.query:
            rows = _rank_by_query(svc, conn, rows, sel.query, sel.limit)
        rows = rows[: sel.limit]
        captions, caption_sources = _training_captions(conn, rows, subject)
    store = svc.need_media()
    items = [(store.read_bytes(r.content_hash), r.content_hash, r.caption) for r in rows]
    resolution = pipeline_dir_resolution(svc.diffusion_base_dir())
    ts, skipped = build(items, resolution, subject.instance_prompt)
    if captions:
        ts.captions = [captions[h] for h in ts.source_hashes]
    models = svc.need_models()
    with models.staging("training-set") as work:
        save_training_set(ts, work)
        models.put(ms.TRAINING_SET, subject.name, work, version=ts.version, make_current=True)
    pairs = zip(ts.source_hashes, ts.images, strict=True)
    return TrainingSetResult(
        ts.version,
        len(ts.images),
        resolution,
        subject.fingerprint(),
        skipped,
        [(h[:12], encode_image(im, "png")) for h, im in pairs][:24],
        curated.left_out,
        dict(caption_sources),
    )


def _training_captions(conn: Any, rows: list, subject: subjects.Subject) -> tuple[dict, dict]:
    """Captions per content hash when the subject trains on captions ({} otherwise: the
    instance prompt alone), and how many came from the manifest, a model or nowhere."""
    settings = subject.captions
    if not settings.use:
        return {}, {"instance_prompt": len(rows)}
    trigger = subject.instance_prompt if settings.trigger is None else settings.trigger
    captions, sources = curate_selection.training_captions(conn, rows, trigger)
    return captions, dict(sources)


def _rank_by_query(svc: Services, conn: Any, rows: list, query: str, limit: int) -> list:
    """Keep the `limit` rows whose images (or captions) score highest for `query`."""
    from mm_pipelines.pipeline.search import QueryModels, search

    qm = QueryModels.from_services(svc, audio=False)
    allowed = {r.content_hash: r for r in rows}
    results = search(conn, qm, query, k=max(limit * 4, 50), modalities=["image"])
    ranked = [allowed[h["content_hash"]] for h in results.images if h["content_hash"] in allowed]
    return ranked[:limit]


def load_training_set(svc: Services, subject_name: str) -> Any:
    from mm_pipelines.models.diffusion.training_set import load_training_set as load

    try:
        return load(svc.need_models().get(ms.TRAINING_SET, subject_name).path)
    except ms.ArtifactNotFound as err:
        raise FileNotFoundError(f"{err}: materialize lora_training_set first") from err


# --------------------------------------------------------------------------- adapter

# defaults under the subject's `lora:` overrides
LORA_DEFAULTS: dict[str, Any] = {
    "checkpoint_every": 50,
    "validation_every": 50,
    "validation_seeds": tuple(range(8)),  # 4 seeds made the early-stopping metric too noisy
    "validation_inference_steps": 20,
    "validation_guidance_scale": 3.0,
}


@dataclass
class AdapterRecord:
    """The lineage of a subject's current adapter, kept as the adapter artifact's metadata."""

    subject: str
    adapter_version: str
    base_model_version: str
    base_store_version: str | None  # None: an external base (MM_DIFFUSION_BASE)
    training_set_version: str
    registered_model: str | None = None
    registered_version: str | None = None
    mlflow_run_id: str | None = None
    steps_done: int = 0
    best_step: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # local folders, resolved when the record is read (never stored: other machines differ)
    adapter_dir: str = ""
    base_model_dir: str = ""


def adapter_record(svc: Services, subject: str) -> AdapterRecord:
    """The subject's current adapter with verified local folders of it and of its base."""
    try:
        artifact = svc.need_models().get(ms.ADAPTER, subject)
    except ms.ArtifactNotFound as err:
        raise FileNotFoundError(f"{err}: materialize lora_adapter first") from err
    record = AdapterRecord(**artifact.metadata)
    record.adapter_dir = str(artifact.path)
    if record.base_store_version:
        base = svc.need_models().get(ms.DIFFUSION_BASE, DEMO, record.base_store_version).path
    else:
        base = Path(svc.choice.diffusion_base)
    record.base_model_dir = str(base)
    return record


@dataclass
class AdapterResult:
    record: AdapterRecord
    resumed_from_step: int | None
    first_loss: float
    final_loss: float
    stopped_early: bool
    best_validation: float | None
    train_seconds: float
    run_url: str
    validation_png: bytes | None = None
    reused: bool = False  # the registered version trained from the same inputs, not retrained


def training_key(subject: subjects.Subject, ts_version: str, base_version: str, cfg: Any) -> str:
    """What an adapter follows from: training set, base model, every setting (not whether to
    resume) and the validation metric. The same key means the same adapter: it is not
    trained or registered again."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    blob = json.dumps(
        [ts_version, base_version, settings, subject.validation_metric, subject.class_prompt],
        sort_keys=True,
        default=str,
    )
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _reuse_registered(svc: Services, subject: str, key: str) -> AdapterResult | None:
    """The registered version trained from `key`, made the subject's current adapter again;
    None when there is none (or its files left the model store)."""
    tracker = svc.need_tracker()
    client = tracker.client()
    mv = registry.find_version(
        client, registry.lora_model_name(subject), registry.TRAINING_KEY_TAG, key
    )
    if mv is None or "adapter_version" not in (mv.tags or {}):
        return None
    version = f"{mv.tags['adapter_version']}-v{mv.version}"
    store = svc.need_models()
    try:
        store.get(ms.ADAPTER, subject, version)
    except ms.ArtifactNotFound:
        return None
    store.set_current(ms.ADAPTER, subject, version)
    run = client.get_run(mv.run_id)
    losses = client.get_metric_history(mv.run_id, "loss")
    final = run.data.metrics.get("final_loss", losses[-1].value if losses else float("nan"))
    return AdapterResult(
        adapter_record(svc, subject),
        None,
        min(losses, key=lambda m: m.step).value if losses else float("nan"),
        final,
        False,
        None,
        0.0,
        tracker.run_url(run.info.experiment_id, mv.run_id),
        reused=True,
    )


def checkpoint_name(subject: str, ts_version: str, base_version: str, cfg: Any, metric: str) -> str:
    """Checkpoints resume only under the same training set, base, resumable settings
    (LoraTrainConfig.fingerprint) and validation metric; a change starts afresh."""
    key = json.dumps([ts_version, base_version, cfg.fingerprint(), metric], sort_keys=True)
    return f"{subject}/{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class _AdapterPlan:
    """What one adapter training is made of: the subject, its training set, the base model,
    the settings and the training key they give."""

    subject: subjects.Subject
    ts: Any
    base_dir: Path
    base_version: str
    base_store_version: str | None
    cfg: Any
    key: str


def _plan_adapter(
    svc: Services, subject_name: str, steps: int | None, resume: bool
) -> _AdapterPlan:
    subject = subjects.get_subject(subject_name)
    ts = load_training_set(svc, subject.name)
    base_dir, base_version, base_store_version = base_model_version(svc)
    cfg = subjects.lora_config(
        subject,
        **LORA_DEFAULTS,
        validation_prompts=subject.generation_prompts[:2],
        resume=resume,
    )
    if steps:
        cfg = dataclasses.replace(cfg, steps=steps)
    key = training_key(subject, ts.version, base_version, cfg)
    return _AdapterPlan(subject, ts, base_dir, base_version, base_store_version, cfg, key)


def train_adapter(
    svc: Services,
    subject_name: str,
    run: RunSpec,
    steps: int | None = None,
    resume: bool = True,
    log: Log = _quiet,
) -> AdapterResult:
    """Train (or resume) the subject's LoRA adapter: tracked, checkpointed through the
    model store, published as the subject's current adapter and registered. The same
    training key as a registered version reuses that version instead."""
    from mm_pipelines.models.diffusion.evaluation import clip_features, validation_metric
    from mm_pipelines.models.diffusion.lora import train_lora

    plan = _plan_adapter(svc, subject_name, steps, resume)
    subject, ts = plan.subject, plan.ts
    if (reused := _reuse_registered(svc, subject.name, plan.key)) is not None:
        log(
            f"{reused.record.registered_model} v{reused.record.registered_version} was trained "
            "from the same training set, base model and settings: reused, not retrained"
        )
        return reused
    features = None
    if subject.validation_metric == "clip_distance":
        features = clip_features(svc.load_clip())
    metric = validation_metric(subject.validation_metric, ts.images, features)
    ckpt_name = checkpoint_name(
        subject.name, ts.version, plan.base_version, plan.cfg, subject.validation_metric
    )
    pipe = svc.load_base_pipeline(plan.base_dir)
    store = svc.need_models()
    spec = run.with_tags(subject=subject.name)
    with (
        store.staging("lora") as work,
        svc.need_tracker().run(spec, system_metrics=True) as tracked,
    ):
        if resume:
            _restore_checkpoint(store, ckpt_name, work)
        images, captions = _augmented_captions(ts, subject)
        _log_settings(tracked, store, plan, len(captions))
        callbacks = _Callbacks(tracked, store, ckpt_name, work, plan, log)
        result = train_lora(
            pipe,
            images,
            captions,
            work,
            plan.cfg,
            class_prompt=subject.class_prompt,
            on_step=callbacks.on_step,
            on_validation=callbacks.on_validation,
            validation_metric=metric,
            on_checkpoint=callbacks.on_checkpoint,
        )
        adapter_version = weights_version(result.adapter_dir, "lora")  # hashes the files once
        _log_outcome(tracked, result, callbacks.val_key, adapter_version)
        _register_and_store(tracked, store, plan, result, adapter_version)
    return AdapterResult(
        adapter_record(svc, subject.name),
        result.resumed_from_step,
        result.losses[0],
        result.losses[-1],
        result.stopped_early,
        result.best_metric,
        round(result.seconds, 1),
        tracked.url,
        callbacks.last_grid,
    )


def _log_settings(tracked: Any, store: ms.ModelStore, plan: _AdapterPlan, samples: int) -> None:
    subject, ts = plan.subject, plan.ts
    tracked.params(
        {
            **{k: v for k, v in dataclasses.asdict(plan.cfg).items() if k != "validation_prompts"},
            "subject": subject.name,
            "instance_prompt": subject.instance_prompt,
            "training_set_version": ts.version,
            "training_images": len(ts.images),
            "base_model_version": plan.base_version,
            "validation_metric": subject.validation_metric,
            **_caption_params(subject, ts, samples),
        }
    )
    review.log_dataset(tracked, store, ms.TRAINING_SET, subject.name, ts, "training")


class _Callbacks:
    """What the trainer reports back: losses and progress, validation image series,
    checkpoints flushed to MLflow and stored (a resume elsewhere starts from them)."""

    def __init__(
        self,
        tracked: Any,
        store: ms.ModelStore,
        ckpt_name: str,
        work: Path,
        plan: _AdapterPlan,
        log: Log,
    ) -> None:
        self.tracked, self.store, self.ckpt_name, self.work = tracked, store, ckpt_name, work
        self.val_key = f"val_{plan.subject.validation_metric}"
        self.eta = Eta(f"LoRA {plan.subject.name}, step", plan.cfg.steps, log)
        self.last_grid: bytes | None = None

    def on_step(self, step: int, loss: float) -> None:
        self.tracked.step("loss", loss, step)
        self.eta(step, f"loss {loss:.4f}")

    def on_validation(self, step: int, images: list, value: float | None) -> None:
        # one frame of the run's "validation" image series (MLflow's step slider)
        self.tracked.image(review.labelled_grid_of(images), key="validation", step=step)
        if value is not None:
            self.tracked.metrics({self.val_key: value}, step=step)
        self.last_grid = encode_image(image_grid([g.image for g in images]), "png")

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.tracked.flush()  # MLflow holds every loss up to a checkpoint once it is stored
        _store_checkpoint(self.store, self.ckpt_name, self.work, path, step)


def _log_outcome(tracked: Any, result: Any, val_key: str, adapter_version: str) -> None:
    review.log_restored_history(tracked, result, val_key)
    tracked.metrics({"final_loss": result.losses[-1], "train_seconds": result.seconds})
    tracked.params(  # how the run went: facts, not curves
        {
            "steps_done": result.steps_done,
            "resumed_from_step": result.resumed_from_step,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "adapter_version": adapter_version,
        }
    )


def _register_and_store(
    tracked: Any, store: ms.ModelStore, plan: _AdapterPlan, result: Any, adapter_version: str
) -> None:
    """Register the adapter (the very same weights registered before: that version, not a
    second one) and store it as the subject's current adapter, the record naming the
    registered version (known only after registering; artifacts are immutable)."""
    subject = plan.subject
    name = registry.lora_model_name(subject.name)
    record = AdapterRecord(
        subject=subject.name,
        adapter_version=adapter_version,
        base_model_version=plan.base_version,
        base_store_version=plan.base_store_version,
        training_set_version=plan.ts.version,
        registered_model=name,
        mlflow_run_id=tracked.run_id,
        steps_done=result.steps_done,
        best_step=result.best_step,
        params={"resumed_from_step": result.resumed_from_step},
    )
    tracked.artifacts(result.adapter_dir, "adapter")
    same = registry.find_version(tracked.tracker.client(), name, "adapter_version", adapter_version)
    if same:
        record.registered_version = str(same.version)
        model_id = same.tags.get("mm.logged_model_id", "")  # the model logged with it
    else:
        model_id = review.log_adapter_model(
            tracked,
            subject,
            result.adapter_dir,
            plan.base_dir,
            plan.base_version,
            plan.base_store_version,
        )
        record.registered_version = tracked.register(
            "adapter",
            name,
            tags={
                "subject": subject.name,
                "adapter_version": adapter_version,
                "base_model_version": plan.base_version,
                "training_set_version": plan.ts.version,
                registry.TRAINING_KEY_TAG: plan.key,
                "mm.logged_model_id": model_id,
            },
            model_id=model_id,
        )
    record.params["logged_model_id"] = model_id
    metadata = {k: v for k, v in dataclasses.asdict(record).items() if k not in _LOCAL_FIELDS}
    stored = store.put(
        ms.ADAPTER,
        subject.name,
        result.adapter_dir,
        version=f"{adapter_version}-v{record.registered_version}",
        metadata=metadata,
        make_current=True,
    )
    tracked.link_version(name, record.registered_version, stored)


_LOCAL_FIELDS = ("adapter_dir", "base_model_dir")


# --------------------------------------------------------------------------- captions


def _augmented_captions(ts: Any, subject: subjects.Subject) -> tuple[list, list[str]]:
    """The training set's images and captions, with kohya-style caption dropout/shuffle
    drawn `variants` times per image when the subject asks for them."""
    c = subject.captions
    if not c.use:
        return list(ts.images), list(ts.captions)
    return curate_selection.caption_variants(
        ts.images, ts.captions, c.variants, c.dropout, c.shuffle, c.keep_tokens, c.seed
    )


def _caption_params(subject: subjects.Subject, ts: Any, samples: int) -> dict[str, Any]:
    c = subject.captions
    params: dict[str, Any] = {"caption_mode": "catalog" if c.use else "instance_prompt"}
    if c.use:
        params.update(
            {
                "caption_trigger": subject.instance_prompt if c.trigger is None else c.trigger,
                "caption_dropout": c.dropout,
                "caption_shuffle": c.shuffle,
                "caption_keep_tokens": c.keep_tokens,
                "caption_variants": c.variants,
                "caption_samples": samples,
                "caption_example": ts.captions[0][:250] if ts.captions else "",
            }
        )
    return params


def _store_checkpoint(store: ms.ModelStore, name: str, work: Path, path: Path, step: int) -> None:
    """A checkpoint with the best snapshot so far, so a resume elsewhere has both."""
    with store.staging("checkpoint") as stage:
        shutil.copytree(path, stage / "checkpoints" / path.name)
        if (work / "best").is_dir():
            shutil.copytree(work / "best", stage / "best")
        artifact = store.put(
            ms.LORA_CHECKPOINT, name, stage, metadata={"step": step}, make_current=True
        )
    store.prune(ms.LORA_CHECKPOINT, name, keep=[artifact.version])


def _restore_checkpoint(store: ms.ModelStore, name: str, work: Path) -> None:
    if store.current(ms.LORA_CHECKPOINT, name) is None:
        return
    artifact = store.get(ms.LORA_CHECKPOINT, name)
    shutil.copytree(artifact.path, work, dirs_exist_ok=True, ignore=_store_files)


def _store_files(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in (ms.MANIFEST, ms.STAMP)]
