"""Batched CLIP encoding of images and texts into L2-normalised float32 vectors.

Images: the next batches are read and decoded while the model runs on this one. Two
input paths (`resolve_decode`):
- "pil" (the CPU default): a torch DataLoader's worker processes decode with PIL (JPEG
  draft decoding, see `open_image`) and apply the bundle's own transform;
- "device" (the CUDA default): worker processes only read JPEG bytes (other formats:
  PIL to uint8), many files to one hand-over buffer, and decoding (nvJPEG), resize and
  normalise run on the model's device (`device_input`), one batch ahead on a side
  stream.
A file that does not decode is reported per index (it never stops the batch).

Texts: CLIP's text tower has a hard context limit (77 tokens for real CLIP, 32 for the
tiny demo model) and open_clip's tokenizer silently truncates past it. Here every text is
split into token windows that fit (with an overlap), and each window is one vector that
records its chunk index and character span, so nothing is ever dropped unseen.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import regex
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mm_pipelines.models.clip.device_input import (
    CHUNK_FILES,
    DevicePreprocess,
    PreparedBatch,
    iter_raw_batches,
    prepare_batch,
)
from mm_pipelines.models.clip.loading import ClipBundle
from mm_pipelines.models.common import available_cpus

ImageSource = str | os.PathLike | bytes | Image.Image
T = TypeVar("T")


# ----------------------------------------------------------------------------- images


@dataclass
class ImageEncodeResult:
    """Vectors for the sources that decoded, in source order, plus the failures."""

    vectors: np.ndarray  # [n_ok, dim] float32, L2-normalised
    indices: list[int]  # source index of each row of `vectors`
    errors: dict[int, str]  # source index -> "ErrorType: message"
    model_version: str
    stats: dict[str, float] = field(default_factory=dict)


def open_image(source: ImageSource, min_side: int | None = None) -> Image.Image:
    """Decode a path, raw bytes or an in-memory image into RGB.

    ``min_side``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides >= min_side; the model input is 224 px or less, so decoding a 4000 px
    photo at full size is wasted work. Tolerance 1e-4 cosine distance to the vectors of a
    full decode; measured max 4.9e-5 (ViT-B-32, random weights, 640x480 photos) and
    4.8e-5 (the trained tiny CLIP, 256 px frames; 2.6e-5 on the photos).
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(Path(source))
    if min_side and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    image.load()  # force the decode here (inside the worker), not lazily later
    return image.convert("RGB")


class _ImageDataset(Dataset):
    def __init__(
        self, sources: Sequence[ImageSource], preprocess: Callable, min_side: int | None
    ) -> None:
        self.sources = sources
        self.preprocess = preprocess
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.preprocess(open_image(self.sources[i], self.min_side)), ""
        except Exception as exc:  # noqa: BLE001 - any decode failure is a per-item status
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    errors = {i: err for i, x, err in batch if x is None}
    tensor = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], tensor, errors


def default_num_workers() -> int:
    """Worker processes of the "pil" path: decoding there competes with the model's CPU
    threads, so few."""
    return min(4, available_cpus())


def default_readers() -> int:
    """Worker processes of the "device" path: they only read files and decode what the
    GPU does not, and a GPU consumes thousands of images a second."""
    return min(16, max(1, available_cpus() - 1))


def lower_priority(_worker_id: int) -> None:
    # Decoding is latency-tolerant (it runs ahead); the model's threads are not, and on a
    # small machine a worker holding a core stalls every step of a multi-threaded forward.
    with contextlib.suppress(OSError):
        os.nice(5)


def model_input_side(bundle: ClipBundle) -> int | None:
    size = getattr(bundle.model.visual, "image_size", None)
    if size is None:
        return None
    return int(max(size)) if isinstance(size, tuple | list) else int(size)


DecodeMode = Literal["auto", "pil", "device"]


@dataclass
class FeatureBatch:
    """One batch of image features on the model's device (nothing copied to the host)."""

    indices: list[int]
    features: torch.Tensor | None  # [len(indices), dim] float32, L2-normalised
    errors: dict[int, str]
    counts: dict[str, int] = field(default_factory=dict)


def resolve_decode(bundle: ClipBundle, decode: DecodeMode = "auto") -> str:
    """ "device" on CUDA when the preprocess is open_clip's eval transform, else "pil".

    "pil": today's CPU path (PIL decode with JPEG draft + the bundle's transform in worker
    processes). "device": workers read bytes / decode to uint8, JPEG decoding, resize and
    normalise run on the model's device (see `device_input`); forced, it runs on CPU too.
    """
    if decode not in ("auto", "pil", "device"):
        raise ValueError(f"decode must be auto, pil or device, got {decode!r}")
    if decode == "pil":
        return "pil"
    supported = DevicePreprocess.from_transform(bundle.preprocess) is not None
    if decode == "device":
        if not supported:
            raise ValueError("decode='device' needs open_clip's eval transform as preprocess")
        return "device"
    return "device" if supported and bundle.device.type == "cuda" else "pil"


def iter_image_features(
    bundle: ClipBundle,
    sources: Sequence[ImageSource],
    batch_size: int = 64,
    num_workers: int | None = None,
    decode: DecodeMode = "auto",
    stats: dict[str, float] | None = None,
) -> Iterator[FeatureBatch]:
    """Encode batch by batch; features stay on the model's device (the caller copies).

    The next batch is read, decoded and preprocessed while the model runs on this one.
    ``stats`` (optional) receives host-side timings: seconds waiting for input and
    seconds launching the model.
    """
    mode = resolve_decode(bundle, decode)
    if mode == "pil":  # a worker process decodes a whole batch: no more than batches
        workers = default_num_workers() if num_workers is None else num_workers
        workers = min(workers, -(-len(sources) // batch_size))
        batches = _pil_batches(bundle, sources, batch_size, workers)
    else:  # a worker reads a few dozen files at a time
        workers = default_readers() if num_workers is None else num_workers
        if bundle.device.type != "cuda":  # CUDA: the process keeps its readers, all of them
            workers = min(workers, -(-len(sources) // CHUNK_FILES))
        batches = _device_batches(bundle, sources, batch_size, workers)
    timings = stats if stats is not None else {}
    timings.update(loader_wait_s=0.0, model_s=0.0, workers=float(workers))
    t_wait = time.perf_counter()
    for batch in batches:
        t_got = time.perf_counter()
        timings["loader_wait_s"] += t_got - t_wait
        features = None
        if batch.pixels is not None:
            # not around the yield: the caller's code must not run in inference mode
            with torch.inference_mode():
                features = encode_image_tensor(bundle, batch.pixels)
        t_wait = time.perf_counter()
        timings["model_s"] += t_wait - t_got
        yield FeatureBatch(batch.indices, features, batch.errors, batch.counts)
        t_wait = time.perf_counter()


def _pil_batches(
    bundle: ClipBundle, sources: Sequence[ImageSource], batch_size: int, workers: int
) -> Iterator[PreparedBatch]:
    loader = DataLoader(
        _ImageDataset(sources, bundle.preprocess, model_input_side(bundle)),
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=lower_priority if workers else None,
        collate_fn=_collate,
        pin_memory=bundle.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for indices, tensor, errors in loader:
        yield PreparedBatch(indices, tensor, errors)


def _device_batches(
    bundle: ClipBundle, sources: Sequence[ImageSource], batch_size: int, workers: int
) -> Iterator[PreparedBatch]:
    """Read in `workers` processes; decode + preprocess on the model's device, one
    batch ahead in a thread and (CUDA) on a side stream, so that neither waits for the
    model's kernels."""
    preprocess = DevicePreprocess.from_transform(bundle.preprocess)
    assert preprocess is not None  # resolve_decode checked it
    cuda = bundle.device.type == "cuda"
    # pinned: PIL-decoded pixels reach the GPU asynchronously; kept: a GPU process pays
    # the readers' start-up (forking from a CUDA process) once, not per call
    raw_batches = iter_raw_batches(
        sources, batch_size, workers, pin=cuda, worker_init_fn=lower_priority, keep_workers=cuda
    )
    side = torch.cuda.Stream(bundle.device) if cuda else None

    def prepare(raw: list) -> tuple[PreparedBatch, torch.cuda.Event | None]:
        with torch.inference_mode(), torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            batch = prepare_batch(raw, sources, preprocess, bundle.device, bundle.input_dtype)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record(side)
        return batch, event

    for batch, event in _ahead(map(prepare, raw_batches), depth=2):
        if event is not None:
            stream = torch.cuda.current_stream(bundle.device)
            stream.wait_event(event)  # the model's stream waits for this batch's pixels
            if batch.pixels is not None:
                batch.pixels.record_stream(stream)
        yield batch


def _ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` in a background thread, up to `depth` items ahead of the consumer;
    an exception in the thread is raised in the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=run, name="clip-input", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def encode_images(
    bundle: ClipBundle,
    sources: Sequence[ImageSource],
    batch_size: int = 64,
    num_workers: int | None = None,
    decode: DecodeMode = "auto",
) -> ImageEncodeResult:
    """Encode images through the image tower; decode/preprocess overlap the model.

    ``num_workers``: worker processes of either input path; None picks a count from
    the CPU count; 0 decodes inline (what tiny inputs and debugging want).
    ``decode``: see `resolve_decode` ("auto": on the GPU for a CUDA model, PIL in the
    workers otherwise). Vectors come to the host asynchronously (pinned memory on CUDA)
    and are waited for once, at the end.
    """
    indices: list[int] = []
    chunks: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    counts: dict[str, int] = {}
    timings: dict[str, float] = {}
    pending: collections.deque = collections.deque()
    cuda = bundle.device.type == "cuda"
    t_start = time.perf_counter()
    for batch in iter_image_features(bundle, sources, batch_size, num_workers, decode, timings):
        errors.update(batch.errors)
        for key, value in batch.counts.items():
            counts[key] = counts.get(key, 0) + value
        if batch.features is None:
            continue
        indices.extend(batch.indices)
        chunks.append(batch.features.to("cpu", non_blocking=cuda))
        if cuda:  # bound the batches in flight: their inputs hold device memory
            event = torch.cuda.Event()
            event.record()
            pending.append(event)
            if len(pending) > 3:
                pending.popleft().synchronize()
    if cuda:
        torch.cuda.synchronize(bundle.device)
    vectors = torch.cat(chunks).numpy() if chunks else np.zeros((0, bundle.embed_dim), np.float32)
    total = time.perf_counter() - t_start
    return ImageEncodeResult(
        vectors=vectors.astype(np.float32, copy=False),
        indices=indices,
        errors=errors,
        model_version=bundle.model_version,
        stats={
            "seconds": total,
            "images_per_s": len(indices) / total if total > 0 else 0.0,
            **timings,
            **{k: float(v) for k, v in counts.items()},
            "decode_on_device": float(resolve_decode(bundle, decode) == "device"),
        },
    )


def encode_image_tensor(bundle: ClipBundle, tensor: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels (any device) -> L2-normalised float32 features on the model's
    device."""
    x = tensor.to(bundle.device, dtype=bundle.input_dtype, non_blocking=True)
    with bundle.autocast():
        features = bundle.model.encode_image(x)
    return torch.nn.functional.normalize(features.float(), dim=-1)


# ----------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class TextChunk:
    """One window of a text that fits the text tower; offsets index the original text."""

    text_index: int
    chunk_index: int
    char_start: int
    char_end: int
    n_tokens: int
    token_ids: tuple[int, ...] | None  # exact ids (SimpleTokenizer); None: re-tokenise text


@dataclass
class TextEncodeResult:
    chunks: list[TextChunk]  # row i of `vectors` is chunks[i]
    vectors: np.ndarray  # [n_chunks, dim] float32, L2-normalised
    model_version: str

    def chunks_of(self, text_index: int) -> list[int]:
        return [i for i, c in enumerate(self.chunks) if c.text_index == text_index]


@dataclass
class _Unit:
    start: int
    end: int
    ids: list[int] | None
    n_tokens: int


def _simple_units(text: str, tokenizer) -> list[_Unit]:
    """Pre-tokens of open_clip's SimpleTokenizer with their character spans.

    SimpleTokenizer tokenises pre-token by pre-token, so the ids of each pre-token are
    exactly its ids inside the whole text and a chunk's ids are a slice of them.
    """
    cache: dict[str, list[int]] = {}
    units = []
    for m in tokenizer.pat.finditer(text):
        piece = m.group()
        ids = cache.get(piece)
        if ids is None:
            ids = cache[piece] = tokenizer.encode(piece)
        if ids:
            units.append(_Unit(m.start(), m.end(), ids, len(ids)))
    return units


def _generic_units(text: str, count: Callable[[str], int]) -> list[_Unit]:
    """Whitespace-delimited words, for tokenizers whose ids we cannot slice (HF ones)."""
    return [_Unit(m.start(), m.end(), None, count(m.group())) for m in regex.finditer(r"\S+", text)]


def _split_oversized(unit: _Unit, max_tokens: int, tokenizer, text: str) -> list[_Unit]:
    """A single pre-token longer than a window (a URL, a hash) becomes several units."""
    if unit.n_tokens <= max_tokens:
        return [unit]
    if unit.ids is None:  # generic: split the characters in half until each part fits
        mid = (unit.start + unit.end) // 2
        left = _Unit(unit.start, mid, None, _count_tokens(tokenizer, text[unit.start : mid]))
        right = _Unit(mid, unit.end, None, _count_tokens(tokenizer, text[mid : unit.end]))
        return _split_oversized(left, max_tokens, tokenizer, text) + _split_oversized(
            right, max_tokens, tokenizer, text
        )
    parts, pos = [], unit.start
    for k in range(0, len(unit.ids), max_tokens):
        ids = unit.ids[k : k + max_tokens]
        # Character span from the decoded token text; exact for ASCII, clamped otherwise.
        width = len(tokenizer.decode(ids).strip())
        end = unit.end if k + max_tokens >= len(unit.ids) else min(unit.end, pos + width)
        parts.append(_Unit(pos, end, ids, len(ids)))
        pos = end
    return parts


def _count_tokens(tokenizer, text: str) -> int:
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "pat"):
        return len(tokenizer.encode(text))
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None:
        raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}")
    return len(hf(text, add_special_tokens=False)["input_ids"])


def _special_tokens(tokenizer) -> int:
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "num_special_tokens_to_add"):
        return int(hf.num_special_tokens_to_add())
    return 2  # <start_of_text> ... <end_of_text>


def chunk_text(
    text: str,
    tokenizer,
    context_length: int,
    overlap_tokens: int = 8,
    text_index: int = 0,
) -> list[TextChunk]:
    """Split ``text`` into windows of at most ``context_length`` tokens with specials.

    Windows break between pre-tokens (words, punctuation) and overlap by up to
    ``overlap_tokens`` tokens, so a phrase cut at one boundary is whole in the next window.
    Every non-blank character of ``text`` lies in at least one chunk's span.
    """
    max_tokens = context_length - _special_tokens(tokenizer)
    if max_tokens < 1:
        raise ValueError(f"context_length {context_length} leaves no room for tokens")
    overlap_tokens = min(overlap_tokens, max_tokens // 2)
    exact = hasattr(tokenizer, "pat") and hasattr(tokenizer, "encode")
    units = (
        _simple_units(text, tokenizer)
        if exact
        else _generic_units(text, lambda s: _count_tokens(tokenizer, s))
    )
    units = [p for u in units for p in _split_oversized(u, max_tokens, tokenizer, text)]
    chunks: list[TextChunk] = []
    start = 0
    while start < len(units):
        end, n = start, 0
        while end < len(units) and n + units[end].n_tokens <= max_tokens:
            n += units[end].n_tokens
            end += 1
        if not exact:
            end, n = _shrink_to_fit(text, units, start, end, max_tokens, tokenizer)
        span = units[start:end]
        ids = tuple(i for u in span for i in u.ids) if exact else None
        chunks.append(TextChunk(text_index, len(chunks), span[0].start, span[-1].end, n, ids))
        if end >= len(units):
            break
        start = _next_start(units, start, end, overlap_tokens)
    return chunks


def _shrink_to_fit(text, units, start, end, max_tokens, tokenizer) -> tuple[int, int]:
    """Word counts need not add up for subword tokenizers: re-count the real span."""
    while True:
        n = _count_tokens(tokenizer, text[units[start].start : units[end - 1].end])
        if n <= max_tokens or end - start == 1:
            return end, n
        end -= 1


def _next_start(units: list[_Unit], start: int, end: int, overlap_tokens: int) -> int:
    nxt, carried = end, 0
    while nxt - 1 > start and carried + units[nxt - 1].n_tokens <= overlap_tokens:
        nxt -= 1
        carried += units[nxt].n_tokens
    return nxt


def _chunk_tokens(bundle: ClipBundle, chunks: Sequence[TextChunk], texts: Sequence[str]):
    tok = bundle.tokenizer
    if all(c.token_ids is not None for c in chunks):
        # Exactly the layout SimpleTokenizer.__call__ makes, from ids we already have.
        out = torch.zeros(len(chunks), bundle.context_length, dtype=torch.long)
        for row, c in enumerate(chunks):
            ids = [tok.sot_token_id, *c.token_ids, tok.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
    return tok([texts[c.text_index][c.char_start : c.char_end] for c in chunks])


def encode_texts(
    bundle: ClipBundle,
    texts: Sequence[str],
    batch_size: int = 256,
    overlap_tokens: int = 8,
) -> TextEncodeResult:
    """Chunk and encode texts; a text that fits gives exactly one chunk, a blank one none."""
    chunks = [
        c
        for i, t in enumerate(texts)
        for c in chunk_text(t, bundle.tokenizer, bundle.context_length, overlap_tokens, i)
    ]
    features = encode_chunk_features(bundle, chunks, texts, batch_size)
    vectors = features.cpu().numpy() if len(chunks) else np.zeros((0, bundle.embed_dim), np.float32)
    return TextEncodeResult(chunks=chunks, vectors=vectors, model_version=bundle.model_version)


def encode_chunk_features(
    bundle: ClipBundle,
    chunks: Sequence[TextChunk],
    texts: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Chunks -> L2-normalised float32 [n, dim] on the model's device (one host copy is
    the caller's, not one per batch)."""
    parts = []
    with torch.inference_mode():
        for k in range(0, len(chunks), batch_size):
            tokens = _chunk_tokens(bundle, chunks[k : k + batch_size], texts)
            tokens = tokens.to(bundle.device, non_blocking=True)
            with bundle.autocast():
                features = bundle.model.encode_text(tokens)
            parts.append(torch.nn.functional.normalize(features.float(), dim=-1))
    if not parts:
        return torch.zeros((0, bundle.embed_dim), dtype=torch.float32, device=bundle.device)
    return torch.cat(parts)


def encode_text_query(bundle: ClipBundle, text: str) -> np.ndarray:
    """One vector for a query: the renormalised mean of its chunks (one for short text)."""
    result = encode_texts(bundle, [text])
    if not result.chunks:
        raise ValueError("empty query text")
    mean = result.vectors.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)
