"""Curation: near-duplicate search through the HNSW index vs an exact all-pairs scan, and
scores / captions throughput of the drivers vs the raw model forward, in one run.

1. Near-duplicates: bench_index.py's clustered vectors (100k x 512 by default), with 2% of
   them planted as edited copies (cosine ~0.94-0.998 to their original). For a sample of
   pictures (half of them planted copies), the `near_duplicates` query (HNSW, tenant +
   kind + encoder filters, k neighbours, cosine >= threshold) vs the exact scan of the
   sample against all vectors (numpy, and pgvector without the index): time and recall of
   the pairs above the threshold.
2. Throughput on one synthetic batch of catalog images with stored CLIP vectors: the
   `content_scores` driver (read vectors, score with the heads, write rows and flags) vs
   the heads' raw forward on the same vectors in memory; the `captions` driver with the
   CLIP zero-shot tagger vs the tagger's raw matrix product; the driver with a
   transformers captioner (a tiny ViT+GPT-2 built from configs) vs its raw `generate`.

Run: .venv/bin/python benchmarks/bench_curation.py [--n 100000 --dim 512 --sample 400]
Prints one JSON object. Everything runs in one process against one embedded Postgres.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from bench_index import clustered_vectors, make_rows
from pgvector.psycopg import register_vector
from PIL import Image

from mm_pipelines.models.curation import heads as hd
from mm_pipelines.models.curation.tagger import ZeroShotTagger, demo_vocabulary
from mm_pipelines.models.demo import shapes
from mm_pipelines.pipeline.curate import captions as curate_captions
from mm_pipelines.pipeline.curate import scores as curate_scores
from mm_pipelines.pipeline.curate.config import CurationChoice
from mm_pipelines.pipeline.curate.dedup import DedupConfig
from mm_pipelines.pipeline.services import Compute, ModelChoice, Services, folder_model_store
from mm_pipelines.storage import catalog, embeddings, vectors
from mm_pipelines.storage.catalog import ObjectRow, SourceRow
from mm_pipelines.storage.media_store import LocalMediaStore
from mm_pipelines.storage.postgres import embedded_server, ensure_schema

PICTURES = vectors.Filters(
    tenant="acme",
    item_kinds=("image", "video_frame"),
    encoder_version="bench-encoder",
    hide_curated=False,
)


def planted(rng: np.random.Generator, n: int, dim: int, share: float) -> tuple[np.ndarray, int]:
    """n unit vectors; the last `share` of them are noisy copies of earlier ones."""
    dups = int(n * share)
    base = clustered_vectors(rng, n - dups, dim)
    src = rng.integers(0, n - dups, dups)
    eps = rng.uniform(0.003, 0.016, (dups, 1)).astype(np.float32)
    copies = base[src] + eps * rng.normal(size=(dups, dim)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return np.concatenate([base, copies]), dups


def near_duplicate_section(conn, args, rng) -> dict:
    x, dups = planted(rng, args.n, args.dim, 0.02)
    rows = [dataclasses.replace(r, tenant="acme") for r in make_rows(x, "bench")]
    with conn.transaction():
        vectors.copy_rows(conn, rows)
    t = time.perf_counter()
    vectors.ensure_index(conn, args.dim)
    index_s = time.perf_counter() - t
    conn.execute("ANALYZE unified_vectors")
    conn.commit()
    half = args.sample // 2
    sample = np.concatenate(
        [rng.choice(args.n - dups, half, replace=False), args.n - dups + rng.choice(dups, half)]
    )
    thr = DedupConfig().clip_threshold

    # what the near_duplicates driver does: every picture's neighbours in one statement
    t = time.perf_counter()
    found = vectors.search_many(conn, x[sample], DedupConfig().neighbours, PICTURES)
    ann_s = time.perf_counter() - t
    ann = {
        (int(q), int(h["content_hash"][1:]))
        for q, hits in zip(sample, found, strict=True)
        for h in hits
        if h["score"] >= thr and int(h["content_hash"][1:]) != q
    }
    times = []  # one query at a time (vectors.search), for the latency
    for q in sample[:50]:
        t_q = time.perf_counter()
        vectors.search(conn, x[q], DedupConfig().neighbours, PICTURES)
        times.append(time.perf_counter() - t_q)

    # exact: every vector of the tenant out of Postgres, then the sample against all of them
    t = time.perf_counter()
    cur = conn.execute(
        "SELECT content_hash, embedding FROM unified_vectors WHERE tenant = 'acme'", prepare=False
    )
    fetched = {h: v for h, v in cur}
    read_s = time.perf_counter() - t
    assert len(fetched) == args.n
    t = time.perf_counter()
    sims = x[sample] @ x.T
    qi, xi = np.nonzero(sims >= thr)
    exact = {(int(sample[a]), int(b)) for a, b in zip(qi, xi, strict=True) if sample[a] != b}
    exact_s = time.perf_counter() - t

    pg_times = []
    for q in sample[:20]:
        t_q = time.perf_counter()
        vectors.search(conn, x[q], DedupConfig().neighbours, PICTURES, exact=True)
        pg_times.append(time.perf_counter() - t_q)
    return {
        "n": args.n,
        "dim": args.dim,
        "planted_copies": dups,
        "sample": len(sample),
        "threshold": thr,
        "neighbours": DedupConfig().neighbours,
        "hnsw_build_s": round(index_s, 1),
        "pairs_exact": len(exact),
        "pairs_hnsw": len(ann),
        "recall": round(len(ann & exact) / max(1, len(exact)), 4),
        "hnsw_single_query_p50_ms": round(statistics.median(times) * 1000, 2),
        "hnsw_batched_sample_s": round(ann_s, 3),
        "hnsw_batched_per_query_ms": round(ann_s / len(sample) * 1000, 2),
        "exact_read_all_vectors_s": round(read_s, 2),
        "exact_numpy_sample_s": round(exact_s, 3),
        "exact_pgvector_query_p50_ms": round(statistics.median(pg_times) * 1000, 1),
        # a new batch of `sample` pictures: its index queries vs reading the tenant's vectors
        # and comparing the batch with all of them
        "new_batch_hnsw_s": round(ann_s, 2),
        "new_batch_exact_numpy_s": round(read_s + exact_s, 2),
        # the whole catalog against itself: n index queries vs n x n exact similarities
        "whole_catalog_hnsw_s_est": round(ann_s * args.n / len(sample), 1),
        "whole_catalog_exact_numpy_s_est": round(read_s + exact_s * args.n / len(sample), 1),
        "whole_catalog_exact_pgvector_s_est": round(statistics.median(pg_times) * args.n, 1),
    }


# --------------------------------------------------------------------------- throughput


def synthetic_batch(conn, svc: Services, bundle, batch: str, n: int, with_pixels: bool):
    """n catalog images of tenant acme with stored CLIP vectors (and, if asked, pixels)."""
    rng = np.random.default_rng(1)
    store = svc.need_media()
    objects, sources, rows = [], [], []
    for i in range(n):
        if with_pixels:
            spec = shapes.all_specs()[i % len(shapes.all_specs())]
            image = shapes.draw_shape(spec.colour, spec.shape, spec.background, 64, seed=i)[0]
            buf = io.BytesIO()
            image.save(buf, "PNG")
            h, _ = store.put_bytes(buf.getvalue())
        else:
            h = f"{batch}-{i:06d}"
        objects.append(
            ObjectRow(h, "image", "image/png", 100, 64, 64, None, None, None, None, "x", "bench")
        )
        sources.append(
            SourceRow(
                batch,
                f"{batch}/{i}.png",
                "acme",
                h,
                "ok",
                None,
                None,
                None,
                "image",
                "image/png",
                100,
                None,
                None,
                "bench",
            )
        )
        v = rng.normal(size=bundle.embed_dim).astype(np.float32)
        v /= np.linalg.norm(v)
        rows.append(
            embeddings.EmbeddingRow(
                f"image:{h}",
                bundle.model_version,
                "image",
                h,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                v,
            )
        )
    catalog.replace_batch(conn, batch, sources, objects)
    embeddings.save(conn, rows)
    conn.commit()
    return np.stack([r.embedding for r in rows])


def throughput_section(dsn: str, root: Path, args) -> dict:
    from mm_pipelines.models.clip.loading import load_clip, save_checkpoint

    ckpt = root / "clip.safetensors"
    save_checkpoint(load_clip(checkpoint=None, seed=0).model, ckpt)
    bundle = load_clip(checkpoint=str(ckpt))
    svc = Services(
        dsn=lambda: dsn,
        media=LocalMediaStore(root / "media"),
        models=folder_model_store(root / "models"),
        compute=Compute(device="cpu"),
        choice=ModelChoice(clip_checkpoint=str(ckpt)),
    )
    heads = {}
    for name in ("aesthetic", "unsafe", "text_unsafe"):
        hd.save_head(hd.ScoringHead(hd.HeadConfig(name, bundle.embed_dim)), root / "heads")
        heads[name] = str(root / "heads" / f"{name}.safetensors")
    choice = CurationChoice(heads["aesthetic"], heads["unsafe"], heads["text_unsafe"])
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        x = synthetic_batch(conn, svc, bundle, "scores", args.items, with_pixels=False)
        t = time.perf_counter()
        embeddings.load(
            conn, [f"image:scores-{i:06d}" for i in range(args.items)], bundle.model_version
        )
        read_s = time.perf_counter() - t
    loaded = [hd.load_head(p) for p in (heads["aesthetic"], heads["unsafe"])]
    t = time.perf_counter()
    for h in loaded:
        hd.score(h.head, x)
    raw_scores_s = time.perf_counter() - t
    t = time.perf_counter()
    result = curate_scores.score_batch(svc, choice, "scores")
    driver_scores_s = time.perf_counter() - t
    assert result.scored_now["unsafe"] == args.items

    t = time.perf_counter()
    tagger = ZeroShotTagger(bundle, demo_vocabulary())
    tagger_build_s = time.perf_counter() - t
    t = time.perf_counter()
    tagger.tag(x)
    raw_tag_s = time.perf_counter() - t
    t = time.perf_counter()
    tagged = curate_captions.caption_batch(svc, CurationChoice(), "scores")
    driver_tag_s = time.perf_counter() - t
    assert tagged.captioned_now == args.items

    captioner_dir = tiny_captioner(root / "captioner")
    from mm_pipelines.models.curation.captioner import ImageCaptioner

    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        synthetic_batch(conn, svc, bundle, "pixels", args.captioner_items, with_pixels=True)
    images = [
        Image.open(io.BytesIO(svc.media.read_bytes(h))).convert("RGB")
        for h in sorted(_hashes(dsn, "pixels"))
    ]
    captioner = ImageCaptioner(captioner_dir, max_new_tokens=30)
    t = time.perf_counter()
    for start in range(0, len(images), curate_captions.CAPTIONER_BATCH):
        captioner.caption(images[start : start + curate_captions.CAPTIONER_BATCH])
    raw_cap_s = time.perf_counter() - t
    t = time.perf_counter()
    done = curate_captions.caption_batch(
        svc, CurationChoice(captioner=str(captioner_dir)), "pixels"
    )
    driver_cap_s = time.perf_counter() - t
    assert done.captioned_now + done.already_captioned == args.captioner_items

    def rate(n: int, s: float) -> float:
        return round(n / s, 1)

    return {
        "scores": {
            "items": args.items,
            "heads": ["aesthetic", "unsafe"],  # the image heads
            "driver_items_per_s": rate(args.items, driver_scores_s),
            "raw_forward_items_per_s": rate(args.items, raw_scores_s),
            "vector_read_only_items_per_s": rate(args.items, read_s),
            "ratio_driver_vs_raw_forward": round(raw_scores_s / driver_scores_s, 4),
            "ratio_driver_vs_vector_read": round(read_s / driver_scores_s, 3),
        },
        "captions_tagger": {
            "items": args.items,
            "candidates": len(tagger.sentences),
            "driver_items_per_s": rate(args.items, driver_tag_s),
            "raw_forward_items_per_s": rate(args.items, raw_tag_s),
            "tagger_build_s": round(tagger_build_s, 3),
            "ratio_driver_vs_raw_forward": round(raw_tag_s / driver_tag_s, 4),
        },
        "captions_transformers": {
            "items": args.captioner_items,
            "model": "tiny ViT+GPT-2 (random weights)",
            "max_new_tokens": 30,
            "driver_items_per_s": rate(args.captioner_items, driver_cap_s),
            "raw_generate_items_per_s": rate(args.captioner_items, raw_cap_s),
            "ratio_driver_vs_raw_forward": round(raw_cap_s / driver_cap_s, 3),
        },
    }


def _hashes(dsn: str, batch: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT content_hash FROM media_sources WHERE batch = %s", (batch,))
        return [r[0] for r in rows]


def tiny_captioner(folder: Path) -> Path:
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    from mm_pipelines.models.demo.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer(40)
    enc = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    dec = GPT2Config(
        vocab_size=len(tok),
        n_positions=48,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        add_cross_attention=True,
        is_decoder=True,
    )
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(
        VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    )
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tok.bos_token_id
        cfg.pad_token_id = cfg.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sample", type=int, default=400)
    parser.add_argument("--items", type=int, default=5_000, help="images scored / tagged")
    parser.add_argument("--captioner-items", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mm-bench-curation-") as tmp:
        server = embedded_server(f"{tmp}/pg", cleanup_mode="delete")
        dsn = server.get_uri()
        ensure_schema(dsn)
        with psycopg.connect(dsn) as conn:
            register_vector(conn)
            dedup = near_duplicate_section(conn, args, rng)
        throughput = throughput_section(dsn, Path(tmp), args)
        server.cleanup()
    print(
        json.dumps(
            {
                "benchmark": "curation",
                "near_duplicates": dedup,
                **throughput,
                "targets": {"recall": ">= 0.95", "whole_catalog_hnsw_vs_exact": "faster"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
