"""CLIP image input prepared where the model runs: JPEG decoding in batches (nvJPEG through
torchvision on CUDA), open_clip's eval transform as tensor ops, and the CPU fallbacks.

Why: on a GPU, PIL decode + resize in worker processes fed ~750 images/s to a model that
takes ~8,300 (issue 17, H200, ViT-B-32). Moving decode and resize to the device was not
enough (1,893 of 8,651 images/s on an H100): the DataLoader then handed every file to
the main process as its own shared-memory tensor (a file descriptor each, then pinned
one by one), and a worker process read a whole batch alone. Here worker processes
(`iter_raw_batches`) read JPEG bytes, or decode what nvJPEG is not given (PNG, WebP,
in-memory images, truncated JPEGs) to uint8, a few dozen files per task packed into one
buffer, pinned once in the main process. Decoding, resizing and normalising happen on
the model's device. The same code runs on the CPU with torchvision's libjpeg-turbo
decoder, which is how the tests pin it to open_clip's PIL transform without a GPU.

Failures: a batch nvJPEG rejects is decoded again file by file; a file that still fails
goes to PIL (`open_image`, the CPU path's decoder), and a file PIL rejects becomes the
per-file error record with PIL's message, exactly as on the CPU path. One bad file never
fails the batch.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from mm_pipelines.models.clip.png import PNG_SIGNATURE, decode_png

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
# JPEG bytes per decode call: bounds the full-size images held at once (JPEGs compress
# ~10x, so ~300 MB decoded; a batch of 640x480 photos is one call, of 12 MP photos a few)
DECODE_BYTES = 32 << 20
# pixels per resize call: bounds the float32 copy of large photos (2**26 px = 768 MB RGB)
RESIZE_PIXELS = 1 << 26
# files per reader task: one slow file delays few others and the workers stay busy to the
# end, yet a task's single hand-over buffer is shared by many files
CHUNK_FILES = 32

RawItem = tuple[int, str, torch.Tensor | None, str]  # (index, kind, payload, error)


# ----------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class DevicePreprocess:
    """open_clip's eval transform (Resize(shortest side) -> CenterCrop -> ToTensor ->
    Normalize) on uint8 [3, H, W] tensors, on whatever device they are.

    The resize is PyTorch's antialiased bicubic/bilinear, which uses PIL's kernels
    (a = -0.5 for bicubic), rounded back to uint8 as PIL's output is; output sizes and
    crop offsets follow torchvision's rules for PIL images.
    """

    size: int
    crop: int
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Callable) -> DevicePreprocess | None:
        """Read open_clip's eval Compose; None for any other transform (PIL path then)."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 4:
            return None
        resize, crop, *rest = steps
        normalize = rest[-1]
        middle = rest[:-1]
        if not (isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)):
            return None
        if not isinstance(normalize, T.Normalize) or resize.max_size is not None:
            return None
        if not all(_is_rgb_or_to_tensor(step) for step in middle):
            return None
        size = resize.size if isinstance(resize.size, int) else list(resize.size)
        if isinstance(size, list):
            if len(size) != 1:
                return None
            size = size[0]
        crop_h, crop_w = crop.size
        modes = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}
        if crop_h != crop_w or crop_h > size or resize.interpolation not in modes:
            return None
        return cls(
            size=int(size),
            crop=int(crop_h),
            interpolation=modes[resize.interpolation],
            mean=tuple(float(m) for m in normalize.mean),
            std=tuple(float(s) for s in normalize.std),
        )

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's Resize(int) output size: shorter side -> size, longer truncated."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def __call__(self, images: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """uint8 [3, H, W] images (any sizes, one device) -> normalised [N, 3, crop, crop]."""
        if not images:
            raise ValueError("no images to preprocess")
        device = images[0].device
        out = torch.empty((len(images), 3, self.crop, self.crop), dtype=dtype, device=device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        # non_blocking from the host: no wait for the stream's earlier work (decoding)
        mean = _on(device, self.mean).view(1, 3, 1, 1)
        std = _on(device, self.std).view(1, 3, 1, 1)
        for (h, w), idx in groups.items():
            step = max(1, RESIZE_PIXELS // (h * w))
            for k in range(0, len(idx), step):
                part = idx[k : k + step]
                x = torch.stack([images[i] for i in part]).float()
                x = ((self._resize_crop(x, h, w) / 255.0 - mean) / std).to(dtype)
                if part[-1] - part[0] == len(part) - 1:  # consecutive: a slice, no index
                    out[part[0] : part[-1] + 1] = x
                else:
                    out[_on(device, part, torch.long)] = x
        return out

    def _resize_crop(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        new_h, new_w = self.resized_hw(h, w)
        # PIL resizes in two passes, width first, each rounded to uint8; doing the same
        # brings the mean difference to PIL from 0.15 to 1e-4 uint8 levels (max 1)
        if new_w != w:
            x = self._interpolate(x, (h, new_w))
        if new_h != h:
            x = self._interpolate(x, (new_h, new_w))
        top = int(round((new_h - self.crop) / 2.0))
        left = int(round((new_w - self.crop) / 2.0))
        return x[..., top : top + self.crop, left : left + self.crop]

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(
            x, size=size, mode=self.interpolation, align_corners=False, antialias=True
        )
        return x.add_(0.5).floor_().clamp_(0, 255)  # PIL rounds halves up, not to even


def _on(device: torch.device, values: Sequence, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _is_rgb_or_to_tensor(step: Callable) -> bool:
    """open_clip's RGB conversion (a function or MaybeConvertMode) or ToTensor."""
    from torchvision import transforms as T

    name = getattr(step, "__name__", type(step).__name__)
    return isinstance(step, T.ToTensor) or name in ("_convert_to_rgb", "MaybeConvertMode")


# ----------------------------------------------------------------------------- readers


def read_signed(source: object, signatures: tuple[bytes, ...]) -> bytearray | None:
    """The whole bytes of a source (path or bytes) that starts with one of `signatures`,
    read in one open; None for anything else (no copy, no full read)."""
    head = max(map(len, signatures))
    if isinstance(source, bytes | bytearray | memoryview):
        return bytearray(source) if bytes(source[:head]).startswith(signatures) else None
    if not isinstance(source, str | os.PathLike):
        return None
    with open(source, "rb") as f:
        if not f.read(head).startswith(signatures):
            return None
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.seek(0)
        del data[f.readinto(data) :]  # a file that shrank since fstat
    return data


def complete_jpeg(data: bytearray) -> bool:
    """Start and end markers present. A truncated JPEG must fail the way it fails on CPU
    (PIL), and nvJPEG would decode it into a half-grey image instead; entropy-coded data
    stuffs every 0xFF, so FF D9 near the end is the real end marker."""
    return data.startswith(JPEG_SOI) and JPEG_EOI in data[-32:]


def read_jpeg(source: object) -> bytearray | None:
    """The bytes of a complete JPEG; None for anything else, which PIL then decodes."""
    data = read_signed(source, (JPEG_SOI,))
    return data if data is not None and complete_jpeg(data) else None


def read_png(source: object) -> torch.Tensor | None:
    """`decode_png` of a source that is a PNG; None for anything else."""
    data = read_signed(source, (PNG_SIGNATURE,))
    return None if data is None else decode_png(data)


def pil_pixels(source: object) -> torch.Tensor:
    """PIL decode (the CPU path's `open_image`, full size) -> uint8 [3, H, W], a view of
    height-width-channel memory (moving it to a device keeps that layout; no CPU
    transpose)."""
    from mm_pipelines.models.clip.encode import open_image

    hwc = torch.from_numpy(np.array(open_image(source)))  # type: ignore[arg-type]  # writable
    return hwc.permute(2, 0, 1)


def read_raw(index: int, source: object) -> RawItem:
    """A JPEG's bytes as they are, anything else decoded to uint8 (opaque 8-bit PNGs by
    `decode_png`, the rest by PIL); a source PIL cannot read comes back as its error
    message (never raised)."""
    try:
        data = read_signed(source, (JPEG_SOI, PNG_SIGNATURE))  # one read for either
    except OSError:
        data = None  # unreadable: PIL below reports it as the CPU path does
    if data is not None and complete_jpeg(data):
        return index, "jpeg", torch.frombuffer(data, dtype=torch.uint8), ""
    pixels = decode_png(data) if data is not None else None
    try:
        return index, "pixels", pixels if pixels is not None else pil_pixels(source), ""
    except Exception as exc:  # noqa: BLE001 - any decode failure is a per-item status
        return index, "error", None, f"{type(exc).__name__}: {exc}"


# (index, kind, offset, shape, error): where a chunk's item lies in its one buffer
PackedItem = tuple[int, str, int, tuple[int, ...], str]


def pack(items: list[RawItem], shared: bool = False) -> tuple[torch.Tensor, list[PackedItem]]:
    """Items -> one uint8 buffer (JPEG bytes, pixels height-width-channel) + where each is.
    `shared`: the buffer is made in shared memory, as a reader process hands it over;
    otherwise the DataLoader copies it there (measured 0.8 ms per 640x480 photo, about a
    fifth of decoding a PNG)."""
    parts, meta, offset = [], [], 0
    for index, kind, payload, error in items:
        if payload is None:
            meta.append((index, kind, offset, (), error))
            continue
        flat = payload if kind == "jpeg" else payload.permute(1, 2, 0)
        meta.append((index, kind, offset, tuple(flat.shape), error))
        parts.append(flat.reshape(-1))
        offset += flat.numel()
    buffer = torch.empty(0, dtype=torch.uint8)
    if shared and offset:
        # what PyTorch's default_collate does in a worker: concatenate into shared memory
        buffer = buffer.new(buffer.untyped_storage()._new_shared(offset)).resize_(offset)
    return torch.cat(parts, out=buffer) if parts else buffer, meta


def unpack(buffer: torch.Tensor, meta: list[PackedItem]) -> list[RawItem]:
    """`pack` undone as views of `buffer` (pinned stays pinned)."""
    items: list[RawItem] = []
    for index, kind, offset, shape, error in meta:
        if kind == "error":
            items.append((index, kind, None, error))
            continue
        size = int(np.prod(shape))
        view = buffer[offset : offset + size].view(shape)
        items.append((index, kind, view if kind == "jpeg" else view.permute(2, 0, 1), error))
    return items


class ReadTasks(Dataset):
    """Worker side: a task is (first index, sources); it comes back as `read_raw` of each
    source, packed into one buffer.

    One buffer per task, not a tensor per file: the DataLoader hands each tensor over as
    its own shared-memory file (measured ~0.2 ms per tensor in the main process, and the
    pin-memory thread pins each one), which held an H100 to a fifth of its speed. The
    sources travel with the task, so one set of worker processes serves every call.
    """

    def __getitem__(self, task: tuple[int, Sequence[object]]) -> tuple[torch.Tensor, list]:
        start, sources = task
        items = [read_raw(start + k, source) for k, source in enumerate(sources)]
        return pack(items, shared=get_worker_info() is not None)


class _CurrentTasks(Sampler):
    """The tasks of the call being served: a kept DataLoader iterates its sampler anew
    for every call."""

    def __init__(self) -> None:
        self.tasks: list[tuple[int, Sequence[object]]] = []

    def __iter__(self) -> Iterator[tuple[int, Sequence[object]]]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class ReaderPool:
    """Reader processes kept for the life of the process and reused by every call.

    Forking a worker from a process that holds a CUDA context and a model took ~35 ms
    (0.5-0.7 s for 14 workers on an H100 box, issue 17), as long as the model needs
    for 4,000 images: paid once here, not per call. One call at a time; `iter_raw_batches`
    gives a concurrent caller its own short-lived workers.
    """

    def __init__(
        self, workers: int, pin: bool, prefetch: int, worker_init_fn: Callable | None
    ) -> None:
        self.workers, self.pin, self.pid = workers, pin, os.getpid()
        self.worker_init_fn = worker_init_fn
        self.lock = threading.Lock()
        self._tasks = _CurrentTasks()
        self._loader = DataLoader(
            ReadTasks(),
            sampler=self._tasks,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=worker_init_fn,
            pin_memory=pin,
            prefetch_factor=prefetch,
            persistent_workers=True,
        )

    def serves(self, workers: int, pin: bool, worker_init_fn: Callable | None) -> bool:
        """Enough workers of the same kind."""
        return self.workers >= workers and self.pin == pin and self.worker_init_fn is worker_init_fn

    def read(self, tasks: list[tuple[int, Sequence[object]]]) -> Iterator:
        """The packed tasks in order; the caller holds `lock`. A call left unfinished
        costs the next one only the wait for the tasks still in flight (the DataLoader
        drops their results when it starts the next pass)."""
        self._tasks.tasks = tasks
        yield from self._loader


_pool: ReaderPool | None = None
_pool_lock = threading.Lock()
# a forked child's copy of its parent's pool: kept, because dropping it would shut down
# the parent's workers through the queues both processes hold
_inherited: list[ReaderPool] = []


def reader_pool(
    workers: int, pin: bool, prefetch: int, worker_init_fn: Callable | None
) -> ReaderPool:
    """The process's kept readers, replaced by a larger (or other) set when a call needs it."""
    global _pool
    with _pool_lock:
        if (
            _pool is None
            or _pool.pid != os.getpid()
            or not _pool.serves(workers, pin, worker_init_fn)
        ):
            _retire_pool()
            _pool = ReaderPool(workers, pin, prefetch, worker_init_fn)
        return _pool


def close_reader_pool() -> None:
    """Let the kept readers go (their processes exit); the next call that keeps workers
    starts new ones."""
    with _pool_lock:
        _retire_pool()


def _retire_pool() -> None:
    """Drop the kept pool (its workers exit with it), unless it is a fork's copy of the
    parent's, which is kept aside instead. Under `_pool_lock`."""
    global _pool
    if _pool is not None and _pool.pid != os.getpid():
        _inherited.append(_pool)
    _pool = None


def _tasks(sources: Sequence[object], chunk: int) -> list[tuple[int, Sequence[object]]]:
    return [(k, sources[k : k + chunk]) for k in range(0, len(sources), chunk)]


def iter_raw_batches(
    sources: Sequence[object],
    batch_size: int,
    workers: int,
    pin: bool = False,
    chunk: int = CHUNK_FILES,
    worker_init_fn: Callable[[int], None] | None = None,
    keep_workers: bool = False,
) -> Iterator[list[RawItem]]:
    """`read_raw` of every source, batch by batch in source order, read by `workers`
    processes (0: inline) `chunk` files at a time; ``pin``: in page-locked memory, so
    pixels reach the GPU asynchronously; ``keep_workers``: the process's `ReaderPool`
    (started by the first such call), else workers started for this call alone.

    Processes, not threads: reader threads share the main process's GIL with the
    thread launching the model's kernels, and on an H100 that held reading to 2,303
    images/s and stalled the model (issue 17's measurements).
    """
    chunk = max(1, min(chunk, batch_size))
    tasks = _tasks(sources, chunk)
    # about two batches in flight beyond the one being encoded, however many workers
    prefetch = max(2, -(-2 * batch_size // (chunk * max(1, workers))))
    if workers == 0:
        yield from _cut((ReadTasks()[task] for task in tasks), batch_size)
        return
    if keep_workers:
        pool = reader_pool(workers, pin, prefetch, worker_init_fn)
        if pool.lock.acquire(blocking=False):
            try:
                yield from _cut(pool.read(tasks), batch_size)
            finally:
                pool.lock.release()
            return
    loader = DataLoader(
        ReadTasks(),
        sampler=tasks,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=worker_init_fn,
        pin_memory=pin,
        prefetch_factor=prefetch,
    )
    yield from _cut(loader, batch_size)


def _cut(packed: Iterable, batch_size: int) -> Iterator[list[RawItem]]:
    """Packed tasks -> batches of `batch_size` items, cut across tasks."""
    batch: list[RawItem] = []
    for buffer, meta in packed:
        batch += unpack(buffer, meta)
        while len(batch) >= batch_size:
            yield batch[:batch_size]
            batch = batch[batch_size:]
    if batch:
        yield batch


# ----------------------------------------------------------------------------- main side


@dataclass
class PreparedBatch:
    """One batch ready for the model: pixels on its device, in `indices` order."""

    indices: list[int]
    pixels: torch.Tensor | None
    errors: dict[int, str]
    counts: dict[str, int] = field(default_factory=dict)


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> uint8 RGB [3, H, W] on `device` (nvJPEG on CUDA, libjpeg-turbo
    otherwise) in one call; when the batch call fails, file by file, None where a file
    fails alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    where = device if device.type == "cuda" else torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at torchcodec
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=where))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=where))
            except RuntimeError:
                out.append(None)
        return out


def prepare_batch(
    raw: list[RawItem],
    sources: Sequence[object],
    preprocess: DevicePreprocess,
    device: torch.device,
    dtype: torch.dtype,
    decoder: Callable[[list[torch.Tensor], torch.device], list] = decode_jpegs,
) -> PreparedBatch:
    """Decode the batch's JPEGs on `device` (CPU fallback per file), move the worker-decoded
    pixels there, resize and normalise; failures become per-index errors. ``decoder``:
    `decode_jpegs` (a stand-in lets the tests reproduce nvJPEG's refusals on a CPU)."""
    errors = {i: err for i, kind, _, err in raw if kind == "error"}
    jpegs = [(i, payload) for i, kind, payload, _ in raw if kind == "jpeg"]
    pixels: dict[int, torch.Tensor] = {
        i: payload.to(device, non_blocking=True)
        for i, kind, payload, _ in raw
        if kind == "pixels" and payload is not None
    }
    counts = {"device_decoded": 0, "cpu_fallback": 0}
    for chunk in _by_bytes(jpegs, DECODE_BYTES):
        decoded = decoder([payload for _, payload in chunk], device)
        for (i, _), image in zip(chunk, decoded, strict=True):
            if image is not None:
                pixels[i] = image.to(device, non_blocking=True)
                counts["device_decoded"] += 1
                continue
            counts["cpu_fallback"] += 1
            try:  # the CPU path's decoder, with the source as the CPU path opens it
                pixels[i] = pil_pixels(sources[i]).to(device, non_blocking=True)
            except Exception as exc:  # noqa: BLE001 - any decode failure is a per-item status
                errors[i] = f"{type(exc).__name__}: {exc}"
        # shrink this chunk to model input size now: full-size images are the big ones
        ready = sorted(i for i, _ in chunk if i in pixels)
        if ready:
            small = preprocess([pixels[i] for i in ready], dtype)
            pixels.update({i: small[n] for n, i in enumerate(ready)})
    indices = sorted(pixels)
    if not indices:
        return PreparedBatch([], None, errors, counts)
    done = {i for i, _ in jpegs}  # JPEGs were resized chunk by chunk above
    rest = [i for i in indices if i not in done]
    if rest:
        small = preprocess([pixels[i] for i in rest], dtype)
        pixels.update({i: small[n] for n, i in enumerate(rest)})
    return PreparedBatch(indices, torch.stack([pixels[i] for i in indices]), errors, counts)


def _by_bytes(items: list[tuple[int, torch.Tensor]], budget: int) -> list[list]:
    """Consecutive groups of (index, bytes) whose sizes add up to about `budget` each."""
    groups: list[list] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item[1].numel() > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[1].numel()
    return [g for g in groups if g]
