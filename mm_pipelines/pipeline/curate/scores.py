"""`content_heads` and `content_scores`: scoring heads on the CLIP vectors the catalog
already has, and the per-tenant policy that flags items.

Heads: `aesthetic` and `unsafe` read image vectors (images and video frames),
`text_unsafe` reads text vectors (captions, document chunks, transcript segments). A
configured weights file wins; otherwise `content_heads` trains each head whose labels
appear in the catalog (manifest `label`), tracked in MLflow and published through the
model store. Scores are kept per scored part with the head's version (a re-run skips parts
already scored by the same head); an item (image, video, audio, document) is flagged when
any of its parts reaches a threshold of its tenant's policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry
from mm_pipelines.pipeline.curate.config import (
    AESTHETIC,
    HEAD_SPACE,
    TEXT_UNSAFE,
    UNSAFE,
    CurationChoice,
)
from mm_pipelines.pipeline.services import Services
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage import curation as db
from mm_pipelines.storage import embeddings
from mm_pipelines.storage.postgres import connect

if TYPE_CHECKING:  # torch loads when a step trains or scores, not with the definitions
    from mm_pipelines.models.curation import heads as hd

Log = Callable[[str], None]
LABELLED = "labelled"  # the store name of the heads trained from catalog labels
IMAGE_KINDS = ("image", "video_frame")
TEXT_KINDS = ("caption", "text_chunk", "transcript_segment")


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class HeadSpec:
    name: str
    positive: str  # manifest label of the positive class
    negative: str
    train_kinds: tuple[str, ...]  # item kinds whose vectors it learns from
    # parts that only ever count as negatives: a video labelled safe vouches for every frame,
    # a video labelled unsafe does not make every frame unsafe
    negative_only_kinds: tuple[str, ...] = ()


# what `content_heads` trains when the labels are there
HEAD_SPECS = (
    HeadSpec(UNSAFE, "unsafe", "safe", ("image",), ("video_frame",)),
    HeadSpec(AESTHETIC, "high_quality", "low_quality", ("image",)),
    HeadSpec(TEXT_UNSAFE, "unsafe", "safe", TEXT_KINDS),
)


# --------------------------------------------------------------------------- training


@dataclass
class HeadsResult:
    heads: dict[str, dict[str, Any]]  # name -> version, examples, cross-validated AUC
    skipped: dict[str, str]  # name -> why it was not trained
    encoder_version: str
    store_version: str
    registered_version: str
    run_url: str


def labelled_examples(rows: list[dict], spec: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and 0/1 labels of the rows that carry exactly one of the spec's labels."""
    x, y = [], []
    for r in rows:
        pos, neg = spec.positive in r["labels"], spec.negative in r["labels"]
        if pos == neg:
            continue  # unlabelled for this head, or labelled both ways
        if r["item_kind"] in spec.train_kinds or (
            neg and r["item_kind"] in spec.negative_only_kinds
        ):
            x.append(r["embedding"])
            y.append(1 if pos else 0)
    return (np.stack(x) if x else np.zeros((0, 0), np.float32)), np.asarray(y, np.int64)


def train_content_heads(
    svc: Services,
    run: RunSpec,
    train: hd.HeadTrainConfig | None = None,
    log: Log = _quiet,
) -> HeadsResult:
    """Train every head whose labels have >= 2 examples of each class; one MLflow run;
    the heads published together as the model store's `content-heads/labelled`."""
    from mm_pipelines.models.curation import heads as hd

    train = train or hd.HeadTrainConfig()
    bundle = svc.load_clip()
    with connect(svc.need_dsn()) as conn:
        rows = db.labelled_vectors(conn, bundle.model_version, IMAGE_KINDS + TEXT_KINDS)
    store = svc.need_models()
    done: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with store.staging("content-heads") as work, svc.need_tracker().run(run) as tracked:
        tracked.params({**dataclasses.asdict(train), "encoder_version": bundle.model_version})
        for spec in HEAD_SPECS:
            x, y = labelled_examples(rows, spec)
            n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
            if n_pos < 2 or n_neg < 2:
                skipped[spec.name] = (
                    f"needs >= 2 items labelled {spec.positive!r} and {spec.negative!r} "
                    f"(has {n_pos} and {n_neg})"
                )
                continue
            cfg = hd.HeadConfig(
                spec.name,
                bundle.embed_dim,
                space=HEAD_SPACE[spec.name],
                encoder_version=bundle.model_version,
                positive_label=spec.positive,
                negative_label=spec.negative,
            )
            cv_auc = hd.cross_validated_auc(x, y, cfg, train)
            head = hd.train_head(
                x, y, cfg, train, lambda s, v, n=spec.name: tracked.step(f"{n}_loss", v, s)
            )
            head.cfg.metrics = {
                "cv_auc": cv_auc or float("nan"),
                "positives": n_pos,
                "negatives": n_neg,
            }
            version = hd.save_head(head, work)
            done[spec.name] = {
                "version": version,
                "positives": n_pos,
                "negatives": n_neg,
                "cv_auc": cv_auc,
            }
            tracked.metrics({f"{spec.name}_cv_auc": cv_auc} if cv_auc is not None else {})
            log(f"{spec.name}: {n_pos} vs {n_neg} examples, cross-validated AUC {cv_auc}")
        if not done:
            raise ValueError(
                "no head could be trained: label catalog items in the batch manifest "
                f'(`"label": "unsafe"` / `"safe"`, `"high_quality"` / `"low_quality"`) '
                f"or configure MM_SAFETY_HEAD / MM_AESTHETIC_HEAD ({skipped})"
            )
        tracked.json({"heads": done, "skipped": skipped}, "content_heads.json")
        published = tracked.publish(
            store,
            ms.CONTENT_HEADS,
            LABELLED,
            work,
            registered_name=registry.CONTENT_HEADS_MODEL,
            metadata={
                "heads": {k: v["version"] for k, v in done.items()},
                "encoder_version": bundle.model_version,
            },
            tags={
                "encoder_version": bundle.model_version,
                **{k: v["version"] for k, v in done.items()},
            },
            artifact_path="content_heads",
        )
    return HeadsResult(
        done,
        skipped,
        bundle.model_version,
        published.artifact.version,
        published.registered_version,
        tracked.url,
    )


# --------------------------------------------------------------------------- heads in use


def active_heads(
    svc: Services, choice: CurationChoice, encoder_version: str, dim: int | None
) -> dict[str, hd.LoadedHead]:
    """Configured heads, else the trained ones (if any). A head trained on another CLIP,
    or reading another width, is a clear error rather than silent nonsense."""
    from mm_pipelines.models.curation import heads as hd

    found: dict[str, hd.LoadedHead] = {}
    for name, path in choice.configured_heads().items():
        found[name] = hd.load_head(path, name)
    store = svc.need_models()
    if store.current(ms.CONTENT_HEADS, LABELLED) is not None:
        folder = store.get(ms.CONTENT_HEADS, LABELLED).path
        for name in HEAD_SPACE:
            if name not in found and (folder / f"{name}{hd.WEIGHTS_SUFFIX}").is_file():
                found[name] = hd.load_head(folder, name)
    for name, head in found.items():
        if dim is not None and head.config.input_dim != dim:
            raise ValueError(
                f"{head.path}: head {name!r} reads {head.config.input_dim}-d vectors, "
                f"the CLIP gives {dim}"
            )
        if head.config.encoder_version and head.config.encoder_version != encoder_version:
            raise ValueError(
                f"{head.path}: head {name!r} was trained on {head.config.encoder_version}, the "
                f"catalog is embedded with {encoder_version}: materialize content_heads again"
            )
    return found


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    heads: dict[str, str]  # name -> version
    scored_now: dict[str, int] = field(default_factory=dict)
    already_scored: int = 0
    items: int = 0
    flagged: list[dict[str, Any]] = field(default_factory=list)
    missing_heads: list[str] = field(default_factory=list)

    @property
    def flagged_items(self) -> dict[tuple[str, str], list[str]]:
        """(tenant, content hash) -> the reasons it is flagged."""
        out: dict[tuple[str, str], list[str]] = {}
        for f in self.flagged:
            out.setdefault((f["tenant"], f["content_hash"]), []).append(f["reason"])
        return out

    @property
    def flagged_share(self) -> float:
        return (
            len({(f["tenant"], f["content_hash"]) for f in self.flagged}) / self.items
            if self.items
            else 0.0
        )


def _source_of(item: embeddings.Item) -> str:
    """The catalog item a scored part belongs to."""
    if item.item_kind in ("image", "text_doc", "audio"):
        return item.content_hash
    return item.parent_hash or item.content_hash


def clip_version(svc: Services) -> str:
    """The configured CLIP's version without loading it (vectors are stored already)."""
    from mm_pipelines.models.clip.loading import checkpoint_version

    return checkpoint_version(*svc.clip_source())


def score_batch(
    svc: Services, choice: CurationChoice, batch: str, log: Log = _quiet
) -> ScoreResult:
    from mm_pipelines.models.curation import heads as hd

    version = clip_version(svc)
    transcripts = speech.model_version(svc.choice.whisper_model)
    with connect(svc.need_dsn()) as conn:
        items = embeddings.batch_items(conn, batch, transcripts)
        by_key = {i.item_key: i for i in items}
        rows = embeddings.load(conn, list(by_key), version)
        dim = len(rows[0]["embedding"]) if rows else None
        heads = active_heads(svc, choice, version, dim)
        result = ScoreResult({k: h.version for k, h in heads.items()})
        result.missing_heads = sorted(set(HEAD_SPACE) - set(heads))
        for name, head in heads.items():
            kinds = IMAGE_KINDS if HEAD_SPACE[name] == "image" else TEXT_KINDS
            wanted = [r for r in rows if r["item_kind"] in kinds]
            done = db.scored_keys(conn, [r["item_key"] for r in wanted], name, head.version)
            todo = [r for r in wanted if r["item_key"] not in done]
            result.already_scored += len(wanted) - len(todo)
            values = hd.score(head.head, db.as_matrix(todo, dim or 0)) if todo else []
            db.save_scores(
                conn,
                [
                    db.ScoreRow(
                        r["item_key"],
                        name,
                        head.version,
                        version,
                        r["item_kind"],
                        r["content_hash"],
                        _source_of(_item(by_key, r["item_key"])),
                        float(v),
                    )
                    for r, v in zip(todo, values, strict=True)
                ],
            )
            result.scored_now[name] = len(todo)
        batch_items = db.batch_items(conn, batch)
        result.items = len(batch_items)
        flags = _flags(conn, choice, batch, batch_items, result.heads)
        db.replace_flags(conn, batch, batch_items, flags)
        result.flagged = db.flags_of(conn, batch_items)
    log(f"scored {result.scored_now}, flagged {len(result.flagged)} of {result.items} items")
    return result


def _item(by_key: dict[str, embeddings.Item], key: str) -> embeddings.Item:
    return by_key[key] if key in by_key else by_key[key.rsplit(":", 1)[0]]  # a document chunk


def _flags(
    conn: Any,
    choice: CurationChoice,
    batch: str,
    items: list[tuple[str, str]],
    heads: dict[str, str],
) -> list[db.FlagRow]:
    scores: dict[str, dict[str, dict]] = {}
    for s in db.source_scores(conn, sorted({h for _, h in items}), heads):
        scores.setdefault(s["source_hash"], {})[s["score_name"]] = s
    flags = []
    for tenant, h in items:
        policy = choice.policy.for_tenant(tenant)
        for name, direction, threshold in policy.rules():
            s = scores.get(h, {}).get(name)
            if s is None:
                continue
            value = s["max_score"] if direction == ">=" else s["min_score"]
            if (value >= threshold) if direction == ">=" else (value < threshold):
                where = (
                    "" if s["parts"] == 1 else f" (worst of {s['parts']} parts: {s['worst_kind']})"
                )
                flags.append(
                    db.FlagRow(
                        tenant,
                        h,
                        name,
                        float(value),
                        float(threshold),
                        f"{name} {value:.3f} {direction} {threshold:g}{where}",
                        s["head_version"],
                        dataclasses.asdict(policy),
                        batch,
                    )
                )
    return flags


# --------------------------------------------------------------------------- check


@dataclass
class FlaggedShare:
    flagged: int
    items: int
    by_score: dict[str, int]
    scored: bool  # a safety head scored at least one of the batch's items

    @property
    def share(self) -> float:
        return self.flagged / self.items if self.items else 0.0


def flagged_share(svc: Services, batch: str) -> FlaggedShare:
    with connect(svc.need_dsn()) as conn:
        items = db.batch_items(conn, batch)
        flags = db.flags_of(conn, items)
        scored = db.safety_scored(conn, [h for _, h in items], (UNSAFE, TEXT_UNSAFE))
    by_score: dict[str, int] = {}
    for f in flags:
        by_score[f["score_name"]] = by_score.get(f["score_name"], 0) + 1
    flagged = len({(f["tenant"], f["content_hash"]) for f in flags})
    return FlaggedShare(flagged, len(items), by_score, scored or not items)
