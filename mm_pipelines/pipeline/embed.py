"""Embedding a batch: which catalog items are encoded, by which encoder, and how they are
projected into the unified space. Plain Python over the storage layer (no Dagster)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from mm_pipelines.models.speech import audio_encoder as audio_embed
from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry
from mm_pipelines.pipeline.progress import Eta
from mm_pipelines.pipeline.services import DEMO, UNIFIED, Services
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage import embeddings, vectors
from mm_pipelines.storage.embeddings import EmbeddingRow, Item
from mm_pipelines.storage.media_store import MediaStore
from mm_pipelines.storage.postgres import connect
from mm_pipelines.storage.vectors import to_array

if TYPE_CHECKING:  # torch and open_clip load inside the drivers: every step process imports
    # this module through the code location, most never run a model (~20 s per start here)
    import pandas as pd  # ~1.6 s: only the steps that make or index the frame load it

    from mm_pipelines.models.clip.loading import ClipBundle
    from mm_pipelines.models.unified.projector import UnifiedProjector

_log = logging.getLogger(__name__)
CLIP_KINDS = ("image", "video_frame", "caption", "text_doc", "transcript_segment")
AUDIO_WINDOW_S = 2.0
Progress = Callable[[str], None]


@dataclass
class EncodeStats:
    items: int = 0
    encoded_now: int = 0
    already_done: int = 0
    failed: int = 0
    vectors_written: int = 0


def _done_key(item: Item) -> str:
    # a document is done when its first chunk exists
    return f"{item.item_key}:0" if item.item_kind == "text_doc" else item.item_key


def read_text(store: MediaStore, item: Item) -> str:
    return store.read_bytes(item.content_hash).decode(item.text_encoding or "utf-8", "replace")


def embed_clip_items(
    conn: psycopg.Connection,
    store: MediaStore,
    bundle: ClipBundle,
    items: Sequence[Item],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> EncodeStats:
    """Encode the items of CLIP_KINDS that this model has not encoded yet."""
    from mm_pipelines.models.clip import encode as clip_encode

    wanted = [i for i in items if i.item_kind in CLIP_KINDS]
    done = embeddings.encoded_keys(conn, [_done_key(i) for i in wanted], bundle.model_version)
    todo = [i for i in wanted if _done_key(i) not in done]
    stats = EncodeStats(items=len(wanted), already_done=len(wanted) - len(todo))
    rows: list[EmbeddingRow] = []

    pictures = [i for i in todo if i.item_kind in ("image", "video_frame")]
    if pictures:
        result = clip_encode.encode_images(
            bundle, [store.local_path(i.content_hash) for i in pictures], batch_size, num_workers
        )
        for index, error in result.errors.items():
            _log.warning("image %s did not encode: %s", pictures[index].item_key, error)
        stats.failed += len(result.errors)
        rows += [
            _row(pictures[i], bundle.model_version, v)
            for i, v in zip(result.indices, result.vectors, strict=True)
        ]
        if progress:
            progress(f"encoded {len(result.indices)} images and frames")

    texts = [i for i in todo if i.item_kind != "image" and i.item_kind != "video_frame"]
    if texts:
        bodies = [read_text(store, i) if i.item_kind == "text_doc" else i.text or "" for i in texts]
        result = clip_encode.encode_texts(bundle, bodies)
        for chunk, vector in zip(result.chunks, result.vectors, strict=True):
            item = texts[chunk.text_index]
            if item.item_kind == "text_doc":
                # every chunk is its own row: CLIP's context never truncates a document
                body = bodies[chunk.text_index]
                rows.append(
                    EmbeddingRow(
                        f"{item.item_key}:{chunk.chunk_index}",
                        bundle.model_version,
                        "text_chunk",
                        item.content_hash,
                        None,
                        None,
                        None,
                        chunk.chunk_index,
                        body[chunk.char_start : chunk.char_end],
                        chunk.char_start,
                        chunk.char_end,
                        vector,
                    )
                )
            else:
                rows.append(_row(item, bundle.model_version, vector))
        if progress:
            progress(f"encoded {len(result.chunks)} text chunks of {len(texts)} texts")
    stats.encoded_now = len(todo) - stats.failed
    stats.vectors_written = embeddings.save(conn, rows)
    return stats


def _row(
    item: Item,
    version: str,
    vector: np.ndarray,
    key: str | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    part: int | None = None,
) -> EmbeddingRow:
    return EmbeddingRow(
        key or item.item_key,
        version,
        item.item_kind if key is None else "audio_window",
        item.content_hash,
        item.parent_hash,
        item.start_s if start_s is None else start_s,
        item.end_s if end_s is None else end_s,
        item.part if part is None else part,
        item.text,
        None,
        None,
        vector,
    )


def embed_audio_items(
    conn: psycopg.Connection,
    store: MediaStore,
    encoder: audio_embed.WhisperEncoder,
    items: Sequence[Item],
    window_s: float = AUDIO_WINDOW_S,
    progress: Progress | None = None,
) -> EncodeStats:
    """A whole-file vector and fixed windows (aligned with video frames) per audio item."""
    wanted = [i for i in items if i.item_kind == "audio"]
    done = embeddings.encoded_keys(conn, [i.item_key for i in wanted], encoder.model_version)
    todo = [i for i in wanted if i.item_key not in done]
    stats = EncodeStats(items=len(wanted), already_done=len(wanted) - len(todo))
    for number, item in enumerate(todo, start=1):
        try:
            audio = speech.load_audio(store.local_path(item.content_hash))
        except speech.AudioDecodeError as err:
            _log.warning("audio %s did not decode: %s", item.item_key, err.reason)
            stats.failed += 1
            continue
        whole = audio_embed.embed_audio(encoder, audio)
        windows = audio_embed.embed_windows(encoder, audio, window_s)
        rows = [
            _row(
                item,
                encoder.model_version,
                whole,
                start_s=0.0,
                end_s=len(audio) / audio_embed.SAMPLE_RATE,
            )
        ]
        rows += [
            _row(
                item,
                encoder.model_version,
                v,
                key=f"{item.item_key}:{n}",
                start_s=float(s),
                end_s=float(e),
                part=n,
            )
            for n, (v, s, e) in enumerate(
                zip(windows.vectors, windows.starts_s, windows.ends_s, strict=True)
            )
        ]
        stats.vectors_written += embeddings.save(conn, rows)
        stats.encoded_now += 1
        if progress:
            progress(f"audio {number}/{len(todo)}: {len(rows)} vectors")
    return stats


def projector_pairs(
    conn: psycopg.Connection,
    bundle: ClipBundle,
    audio_version: str,
    transcript_version: str,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Training pairs the data gives for free, from every batch: (audio vector, CLIP vector
    of what is said in it) for speech, (sound window, CLIP vector of the frames shown at
    that time) for videos. Returns audio vectors, targets and a group name per pair."""
    audio_rows = conn.execute(
        "SELECT item_key, content_hash, start_s, end_s, part, embedding FROM item_embeddings "
        "WHERE encoder_version = %s AND item_kind IN ('audio', 'audio_window')",
        (audio_version,),
    ).fetchall()
    said = dict(
        conn.execute(
            "SELECT content_hash, string_agg(text, ' ' ORDER BY segment_index) "
            "FROM transcript_segments WHERE model_version = %s GROUP BY content_hash",
            (transcript_version,),
        ).fetchall()
    )
    segments = defaultdict(list)
    for h, start, end, text in conn.execute(
        "SELECT content_hash, start_s, end_s, text FROM transcript_segments "
        "WHERE model_version = %s",
        (transcript_version,),
    ):
        segments[h].append((start, end, text))
    frames = defaultdict(list)
    for parent, t, vec in conn.execute(
        "SELECT parent_hash, start_s, embedding FROM item_embeddings WHERE encoder_version = %s "
        "AND item_kind = 'video_frame'",
        (bundle.model_version,),
    ):
        frames[parent].append((t, to_array(vec)))

    audio_vecs, texts, text_pairs, frame_pairs = [], [], [], []
    groups: list[str] = []
    for _key, h, start, end, part, vec in audio_rows:
        if part is None and h in said:  # the whole file <-> everything said in it
            audio_vecs.append(to_array(vec))
            texts.append(said[h])
            text_pairs.append(len(audio_vecs) - 1)
            groups.append(h)
            continue
        spoken = " ".join(t for s, e, t in segments.get(h, []) if s < end and e > start)
        shown = [v for t, v in frames.get(h, []) if start <= t < end]
        if spoken:
            audio_vecs.append(to_array(vec))
            texts.append(spoken)
            text_pairs.append(len(audio_vecs) - 1)
            groups.append(h)
        elif shown:
            audio_vecs.append(to_array(vec))
            frame_pairs.append((len(audio_vecs) - 1, np.mean(shown, axis=0)))
            groups.append(h)
    if not audio_vecs:
        raise ValueError("no (audio, text/frame) pairs: embed batches with speech first")
    targets = np.zeros((len(audio_vecs), bundle.embed_dim), np.float32)
    if texts:
        from mm_pipelines.models.unified.projector import mean_text_vectors

        targets[text_pairs] = mean_text_vectors(bundle, texts)
    for index, vec in frame_pairs:
        targets[index] = vec / np.linalg.norm(vec)
    return np.stack(audio_vecs), targets, groups


def unified_frame(
    conn: psycopg.Connection,
    batch: str,
    items: Sequence[Item],
    clip_version: str,
    audio_version: str,
    projector: UnifiedProjector,
) -> pd.DataFrame:
    """Every item of the batch in the unified space, with its lineage, one row per vector."""
    by_key = {i.item_key: i for i in items}
    rows, raw, spaces = [], [], []
    for version, kinds in ((clip_version, CLIP_KINDS), (audio_version, ("audio",))):
        wanted = [k for k, i in by_key.items() if i.item_kind in kinds]
        for r in embeddings.load(conn, wanted, version):
            key = r["item_key"]
            item = by_key[key] if key in by_key else by_key[key.rsplit(":", 1)[0]]
            parent = r["parent_hash"]
            if parent is None and r["item_kind"] in ("text_chunk", "audio_window"):
                parent = item.content_hash  # a chunk or window belongs to its whole file
            rows.append(
                {
                    "batch": batch,
                    "tenant": item.tenant,
                    "item_kind": r["item_kind"],
                    "modality": item.modality,
                    "content_hash": r["content_hash"],
                    "parent_hash": parent,
                    "source_uri": item.source_uri,
                    "start_s": r["start_s"],
                    "end_s": r["end_s"],
                    "chunk_index": r["part"],
                    "text": r["text"],
                    "encoder_version": version,
                    "projector_version": projector.version,
                }
            )
            raw.append(r["embedding"])
            spaces.append(_space(r["item_kind"]))
    import pandas as pd

    frame = pd.DataFrame(rows)
    vectors: list[np.ndarray | None] = [None] * len(rows)
    for space in set(spaces):
        idx = [i for i, s in enumerate(spaces) if s == space]
        for i, v in zip(
            idx, projector.project(space, np.stack([raw[i] for i in idx])), strict=True
        ):
            vectors[i] = v
    frame["embedding"] = vectors
    return frame


def _space(item_kind: str) -> str:
    """Which tower (and so which projection) a stored vector came from."""
    if item_kind in ("audio", "audio_window"):
        return "audio"
    return "image" if item_kind in ("image", "video_frame") else "text"


def vector_rows(frame: pd.DataFrame) -> list[vectors.VectorRow]:
    """DataFrame rows back to typed index rows (pandas turns missing numbers into NaN and
    integers into floats; the database wants NULL and int)."""
    import pandas as pd

    def clean(column: str, value):
        if isinstance(value, np.ndarray):
            return value
        if value is None or pd.isna(value):
            return None
        if column == "chunk_index":
            return int(value)
        if column in ("start_s", "end_s"):
            return float(value)
        return value

    return [
        vectors.VectorRow(**{c: clean(c, record[c]) for c in vectors.COLUMNS})
        for record in frame.to_dict("records")
    ]


# --------------------------------------------------------------------------- stage drivers


def _quiet(_: str) -> None:
    pass


@dataclass
class ClipModelResult:
    model_version: str
    trained_here: bool
    heldout_recall_at_1: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    registered_version: str | None = None
    run_url: str | None = None


def build_clip_model(
    svc: Services, run: RunSpec, steps: int | None = None, seed: int = 0, log: Progress = _quiet
) -> ClipModelResult:
    """The configured CLIP (checked to load), or the demo's tiny CLIP trained on drawn
    shapes, tracked, published to the model store and registered."""
    import dataclasses

    if svc.choice.clip_checkpoint:
        return ClipModelResult(svc.load_clip().model_version, trained_here=False)
    store = svc.need_models()
    # the run opens before open_clip and torch load (seconds): MLflow down fails at once
    with store.staging("clip") as work, svc.need_tracker().run(run) as tracked:
        from mm_pipelines.models.clip.loading import WEIGHTS_FILENAME, load_clip
        from mm_pipelines.models.demo import tiny_clip

        default = tiny_clip.DEMO_TRAIN_CONFIG
        cfg = dataclasses.replace(default, steps=steps or default.steps, seed=seed)
        device = svc.compute.torch_device()
        tracked.params(cfg.to_dict())

        eta = Eta("CLIP training, step", cfg.steps, log)

        def progress(step: int, loss: float) -> None:
            tracked.step("loss", loss, step)
            eta(step + 1, f"loss {loss:.3f}")

        target = work / WEIGHTS_FILENAME
        result = tiny_clip.train_clip(cfg, device=device, progress=progress, checkpoint_path=target)
        bundle = load_clip(cfg.architecture, target, device=device)
        recall = tiny_clip.evaluate_on_heldout(bundle)
        tracked.metrics({"heldout_recall_at_1": recall, "train_seconds": result.seconds})
        published = tracked.publish(
            store,
            ms.CLIP,
            DEMO,
            work,
            registered_name=registry.CLIP_MODEL,
            metadata={"weights": target.name, "model_version": bundle.model_version},
            tags={"model_version": bundle.model_version},
            artifact_path="clip",
        )
    return ClipModelResult(
        bundle.model_version,
        True,
        recall,
        result.steps_done,
        round(result.seconds, 1),
        published.registered_version,
        tracked.url,
    )


@dataclass
class BatchEncodeResult:
    model_version: str
    stats: EncodeStats


def embed_clip_batch(
    svc: Services, batch: str, batch_size: int = 64, log: Progress = _quiet
) -> BatchEncodeResult:
    """CLIP vectors of the batch's images, frames, captions, texts and transcript segments."""
    bundle = svc.load_clip()
    transcript_version = speech.model_version(svc.choice.whisper_model)
    with connect(svc.need_dsn()) as conn:
        items = embeddings.batch_items(conn, batch, transcript_version)
        stats = embed_clip_items(
            conn,
            svc.need_media(),
            bundle,
            items,
            batch_size,
            svc.compute.dataloader_workers,
            progress=log,
        )
    return BatchEncodeResult(bundle.model_version, stats)


def embed_audio_batch(svc: Services, batch: str, log: Progress = _quiet) -> BatchEncodeResult:
    """Whisper-encoder vectors of the batch's audio files and video sound tracks."""
    encoder = audio_embed.load_whisper_encoder(
        svc.choice.whisper_model, device=svc.compute.torch_device()
    )
    with connect(svc.need_dsn()) as conn:
        items = embeddings.batch_items(conn, batch, None)
        stats = embed_audio_items(conn, svc.need_media(), encoder, items, progress=log)
    return BatchEncodeResult(encoder.model_version, stats)


@dataclass
class ProjectorResult:
    projector_version: str
    pairs: int
    metrics: dict[str, float]
    registered_version: str
    run_url: str


def train_unified_projector(svc: Services, run: RunSpec, log: Progress = _quiet) -> ProjectorResult:
    """The audio head into CLIP's space, trained on every batch's speech<->transcript and
    sound<->frame pairs; tracked, published to the model store and registered."""
    from mm_pipelines.models.unified import projector as proj

    bundle = svc.load_clip()
    whisper = svc.choice.whisper_model
    audio_version = audio_embed.load_whisper_encoder(whisper).model_version
    with connect(svc.need_dsn()) as conn:
        audio, targets, groups = projector_pairs(
            conn, bundle, audio_version, speech.model_version(whisper)
        )
    log(f"training the audio head on {len(audio)} pairs")
    store = svc.need_models()
    with store.staging("projector") as work, svc.need_tracker().run(run) as tracked:
        cfg = proj.ProjectorTrainConfig()
        eta = Eta("audio head training, step", cfg.steps, log)
        tracked.params({**vars(cfg), "pairs": len(audio)})
        result = proj.train_projector(
            audio,
            targets,
            groups,
            cfg,
            bundle.model_version,
            audio_version,
            device=svc.compute.torch_device(),
            progress=lambda step, loss: (tracked.step("loss", loss, step), eta(step + 1)),
        )
        version = proj.save_projector(result.projector, work)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        tracked.metrics(metrics)
        published = tracked.publish(
            store,
            ms.PROJECTOR,
            UNIFIED,
            work,
            registered_name=registry.PROJECTOR_MODEL,
            metadata={"projector_version": version},
            tags={"projector_version": version},
            artifact_path="projector",
        )
    return ProjectorResult(version, len(audio), metrics, published.registered_version, tracked.url)


@dataclass
class UnifiedResult:
    frame: pd.DataFrame
    projector_version: str

    @property
    def by_kind(self) -> dict[str, int]:
        return self.frame["item_kind"].value_counts().to_dict() if len(self.frame) else {}

    @property
    def dim(self) -> int:
        return int(len(self.frame["embedding"].iloc[0])) if len(self.frame) else 0


def unified_batch(svc: Services, batch: str) -> UnifiedResult:
    """Every item of the batch in the unified space, with its lineage."""
    from mm_pipelines.models.unified.projector import load_projector

    projector = load_projector(svc.projector_dir(), device=svc.compute.torch_device())
    with connect(svc.need_dsn()) as conn:
        items = embeddings.batch_items(conn, batch, speech.model_version(svc.choice.whisper_model))
        frame = unified_frame(
            conn,
            batch,
            items,
            projector.config.clip_model_version,
            projector.config.audio_model_version,
            projector,
        )
    return UnifiedResult(frame, projector.version)


def index_batch(svc: Services, batch: str, frame: pd.DataFrame) -> tuple[int, int]:
    """Replace the batch's rows in pgvector in one transaction: (written, index total)."""
    rows = vector_rows(frame)
    with connect(svc.need_dsn()) as conn:
        written = vectors.replace_batch(conn, batch, rows)
        return written, vectors.count(conn)


def index_recall(svc: Services, batch: str, sample_queries: int, k: int = 10) -> dict[int, float]:
    """HNSW top-k vs exact search on a sample of the batch's vectors, per dimension."""
    with connect(svc.need_dsn()) as conn:
        return {
            dim: vectors.recall_at_k(
                conn, vectors.sample_embeddings(conn, sample_queries, dim, batch), k
            )
            for dim in vectors.batch_dims(conn, batch)
        }
