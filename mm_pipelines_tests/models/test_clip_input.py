"""CLIP image input on the model's device (models.clip.device_input), checked on the CPU
with the same code the GPU runs: only the JPEG decoder differs there (nvJPEG instead of
libjpeg-turbo; how close nvJPEG is gets measured by benchmarks/gpu_check.py).

Stated tolerances: the device transform is within 2 uint8 levels of open_clip's PIL
transform at any pixel and 0.01 levels on average (measured: max 2 at single pixels,
mean <= 0.005), and its vectors are within 1e-4 cosine distance of the CPU path's (which
decodes JPEGs with PIL's draft mode; measured <= 5e-5 with a random ViT-B-32).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mm_pipelines.models.clip.device_input import (
    DevicePreprocess,
    close_reader_pool,
    decode_jpegs,
    iter_raw_batches,
    pil_pixels,
    prepare_batch,
    read_png,
    read_raw,
)
from mm_pipelines.models.clip.encode import encode_images, open_image
from mm_pipelines.models.clip.loading import TINY_ARCH, ClipBundle, load_clip
from mm_pipelines.models.common import encode_image
from mm_pipelines.storage.media_store import LocalMediaStore, sha256_bytes

COSINE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    return load_clip(TINY_ARCH, None, device="cpu")


def _photo(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: photo-like content that resizing can get wrong."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    base = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    pixels = base + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(folder: Path, name: str, image: Image.Image, **kwargs) -> str:
    path = folder / name
    image.save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Landscape and portrait JPEGs (one progressive, one CMYK), a PNG, a tiny image that
    is upscaled, and one already at the model's input size."""
    d = tmp_path_factory.mktemp("photos")
    return [
        _write(d, "land.jpg", _photo(0, 320, 240), quality=90),
        _write(d, "port.jpg", _photo(1, 180, 300), quality=85, progressive=True),
        _write(d, "cmyk.jpg", _photo(2, 200, 150).convert("CMYK"), quality=90),
        _write(d, "shot.png", _photo(3, 150, 100)),
        _write(d, "tiny.jpg", _photo(4, 20, 28), quality=95),
        _write(d, "exact.png", _photo(5, 32, 32)),
    ]


@pytest.mark.parametrize(
    "size,interpolation", [(224, "bicubic"), (32, "bicubic"), (64, "bilinear")]
)
def test_device_transform_matches_open_clips_pil_transform(
    files: list[str], size: int, interpolation: str
) -> None:
    transform = open_clip.image_transform(size, is_train=False, interpolation=interpolation)
    device_transform = DevicePreprocess.from_transform(transform)
    assert device_transform is not None and device_transform.interpolation == interpolation
    to_levels = torch.tensor(device_transform.std).view(3, 1, 1) * 255
    for source in files:
        expected = transform(open_image(source))
        got = device_transform([pil_pixels(source)], torch.float32)[0]
        assert got.shape == expected.shape
        levels = (got - expected).abs() * to_levels  # in uint8 steps of the resized image
        assert float(levels.max()) <= 2 + 1e-3, source
        assert float(levels.mean()) <= 0.01, source


def test_other_transforms_are_left_to_pil() -> None:
    longest = open_clip.image_transform(64, is_train=False, resize_mode="longest")
    assert DevicePreprocess.from_transform(longest) is None
    assert DevicePreprocess.from_transform(lambda image: image) is None


def _store_frames(root: Path, n: int) -> list[Path]:
    """Video frames as the understand stage stores them: JPEG bytes in the media store,
    content-addressed paths without a suffix."""
    store = LocalMediaStore(root)
    paths = []
    for i in range(n):
        data = encode_image(np.asarray(_photo(10 + i, 320, 180)), "jpeg", quality=90)
        content_hash = sha256_bytes(data)
        tmp = root / f"frame{i}.jpg"
        tmp.write_bytes(data)
        store.put_file(tmp, content_hash)
        paths.append(store.local_path(content_hash))
    return paths


def _max_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float((1 - (a * b).sum(axis=1)).max())


def test_device_path_vectors_match_the_cpu_path(
    bundle: ClipBundle, files: list[str], tmp_path: Path
) -> None:
    frames = _store_frames(tmp_path / "media", 3)
    sources = [*files, *frames, _photo(6, 64, 48)]  # files, stored frames, an in-memory image
    on_device = encode_images(bundle, sources, batch_size=4, num_workers=0, decode="device")
    on_cpu = encode_images(bundle, sources, batch_size=4, num_workers=0, decode="pil")
    assert on_device.indices == on_cpu.indices == list(range(len(sources)))
    assert on_device.errors == on_cpu.errors == {}
    assert _max_cosine_distance(on_device.vectors, on_cpu.vectors) <= COSINE_TOLERANCE
    jpegs = sum(1 for s in sources[:-1] if Path(s).read_bytes()[:2] == b"\xff\xd8")
    assert on_device.stats["device_decoded"] == jpegs  # the frames included
    assert on_device.stats["decode_on_device"] == 1.0 and on_cpu.stats["decode_on_device"] == 0.0


def test_auto_keeps_the_pil_path_on_cpu(bundle: ClipBundle, files: list[str]) -> None:
    result = encode_images(bundle, files[:2], num_workers=0)
    assert result.stats["decode_on_device"] == 0.0


def _bad_sources(folder: Path, good: str) -> list[object]:
    data = Path(good).read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated: no end marker
    (folder / "junk.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2 + b"\xff\xd9")
    (folder / "notes.txt").write_text("not an image")
    png = io.BytesIO()
    _photo(7, 40, 30).save(png, format="PNG")
    (folder / "cut.png").write_bytes(png.getvalue()[:-40])
    return [
        good,
        str(folder / "junk.jpg"),  # markers intact: the JPEG decoder rejects it, then PIL
        str(folder / "cut.jpg"),
        str(folder / "missing.jpg"),
        str(folder / "notes.txt"),
        str(folder / "cut.png"),
        b"\xff\xd8\xff\xe0 garbage bytes \xff\xd9",
        data,  # the good JPEG again, as bytes
    ]


def test_bad_files_fail_alone_with_the_cpu_paths_errors(
    bundle: ClipBundle, files: list[str], tmp_path: Path
) -> None:
    sources = _bad_sources(tmp_path, files[0])
    # one batch holds good and bad JPEGs; worker processes hand over bytes and uint8 pixels
    on_device = encode_images(bundle, sources, batch_size=8, num_workers=3, decode="device")
    on_cpu = encode_images(bundle, sources, batch_size=8, num_workers=0, decode="pil")
    assert on_device.indices == on_cpu.indices == [0, 7]
    assert on_device.errors == on_cpu.errors
    assert set(on_device.errors) == {1, 2, 3, 4, 5, 6}
    assert "missing.jpg" in on_device.errors[3] and "truncated" in on_device.errors[2]
    assert _max_cosine_distance(on_device.vectors, on_cpu.vectors) <= COSINE_TOLERANCE
    assert on_device.stats["cpu_fallback"] == 2  # junk.jpg and the garbage bytes


def test_a_reader_hands_over_jpeg_bytes_and_uint8_pixels(files: list[str]) -> None:
    index, kind, payload, error = read_raw(0, files[0])
    assert (index, kind, error) == (0, "jpeg", "")
    assert payload.dtype == torch.uint8 and payload.numpy().tobytes() == Path(files[0]).read_bytes()
    index, kind, payload, error = read_raw(1, files[3])
    assert kind == "pixels" and payload.dtype == torch.uint8 and payload.shape == (3, 100, 150)


def test_worker_chunks_arrive_as_batches_in_source_order(files: list[str], tmp_path: Path) -> None:
    """Workers read 3 files per task into one buffer each; the batches of 4 are cut
    across tasks, and every payload is the same as read inline."""
    sources = [*files * 3, str(tmp_path / "missing.png")]  # JPEG, PNG and a failure
    batches = list(iter_raw_batches(sources, batch_size=4, workers=2, chunk=3))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 3]
    assert [item[0] for b in batches for item in b] == list(range(19))
    inline = [read_raw(i, s) for i, s in enumerate(sources)]
    for (i, kind, payload, error), expected in zip(
        [item for b in batches for item in b], inline, strict=True
    ):
        assert (i, kind, error) == (expected[0], expected[1], expected[3])
        assert payload is None if kind == "error" else torch.equal(payload, expected[2])
    assert batches[-1][-1][1] == "error" and "missing.png" in batches[-1][-1][3]


def test_a_jpeg_the_gpu_decoder_refuses_is_decoded_by_pil(
    bundle: ClipBundle, files: list[str]
) -> None:
    """nvJPEG refuses some JPEGs PIL reads (e.g. some CMYK/arithmetic-coded files); a
    stand-in for it that refuses the CMYK file sends that one file to PIL."""
    cmyk = files[2]

    def refuses_cmyk(data: list[torch.Tensor], device: torch.device) -> list:
        decoded = decode_jpegs(data, device)
        return [
            None if d.numpy().tobytes() == Path(cmyk).read_bytes() else out
            for d, out in zip(data, decoded, strict=True)
        ]

    transform = DevicePreprocess.from_transform(bundle.preprocess)
    batch = prepare_batch(
        [read_raw(i, files[i]) for i in range(3)],
        files[:3],
        transform,
        torch.device("cpu"),
        torch.float32,
        decoder=refuses_cmyk,
    )
    assert batch.indices == [0, 1, 2] and batch.errors == {}
    assert batch.counts == {"device_decoded": 2, "cpu_fallback": 1}
    expected = transform([pil_pixels(cmyk)], torch.float32)[0]
    torch.testing.assert_close(batch.pixels[2], expected)


def _png_modes(folder: Path) -> dict[str, str]:
    """One PNG per colour type PIL writes, 8 bits and fewer, with and without
    transparency, plus a 16-bit one."""
    rgb = _photo(8, 40, 30)
    rgba = np.array(rgb.convert("RGBA"))
    rgba[..., 3] = np.arange(40, dtype=np.uint8)[None, :] * 6
    palette = rgb.convert("P")
    used_index = int(np.asarray(palette)[0, 0])  # a transparent colour the image shows
    images = {
        "rgb": (rgb, {}),
        "rgb_colour_key": (rgb, {"transparency": tuple(np.asarray(rgb)[0, 0].tolist())}),
        "rgba": (Image.fromarray(rgba), {}),
        "gray": (rgb.convert("L"), {}),
        "gray_alpha": (Image.fromarray(rgba).convert("LA"), {}),
        "palette": (palette, {}),
        "palette_transparent": (palette, {"transparency": used_index}),
        "bilevel": (rgb.convert("1"), {}),
        "gray_16_bit": (Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), {}),
    }
    return {
        name: _write(folder, f"{name}.png", image, **kw) for name, (image, kw) in images.items()
    }


def test_pngs_decode_to_the_pixels_pil_gives(tmp_path: Path) -> None:
    """Readers decode opaque 8-bit PNGs with `decode_png` (ISA-L + Wuffs, faster than
    PIL); every colour type gives PIL's RGB pixels exactly, and what Wuffs would give
    otherwise (transparency blended, 16 bits) goes to PIL."""
    by_pil = {"rgb_colour_key", "rgba", "gray_alpha", "palette_transparent", "gray_16_bit"}
    for name, path in _png_modes(tmp_path).items():
        _, kind, payload, error = read_raw(0, path)
        assert (kind, error) == ("pixels", ""), name
        assert payload.dtype == torch.uint8, name
        assert torch.equal(payload, pil_pixels(path)), name
        assert (read_png(path) is None) == (name in by_pil), name  # ours or PIL's?


def _damaged_pngs(folder: Path) -> dict[str, str]:
    """A photo PNG damaged three ways: a wrong chunk checksum, a changed compressed
    byte (its chunk checksum made right again), and the end cut off."""
    good = io.BytesIO()
    _photo(9, 64, 48).save(good, format="PNG")
    data = good.getvalue()
    idat = data.index(b"IDAT") - 4
    length = int.from_bytes(data[idat : idat + 4], "big")
    crc_at = idat + 8 + length

    def with_crc(damaged: bytearray) -> bytearray:
        damaged[crc_at : crc_at + 4] = zlib.crc32(damaged[idat + 4 : crc_at]).to_bytes(4, "big")
        return damaged

    bad_crc = bytearray(data)
    bad_crc[crc_at] ^= 0xFF
    bad_data = bytearray(data)
    bad_data[idat + 8 + length // 2] ^= 0x10
    damaged = {"bad_crc": bad_crc, "bad_data": with_crc(bad_data), "cut": data[:-60]}
    paths = {}
    for name, content in damaged.items():
        paths[name] = str(folder / f"{name}.png")
        Path(paths[name]).write_bytes(bytes(content))
    return paths


def test_damaged_pngs_read_as_pil_reads_them_and_spare_the_reader(tmp_path: Path) -> None:
    """libpng through torchvision crashed the reader process on a wrong checksum (and
    the whole call with it); the readers now leave damaged PNGs to PIL: the same pixels
    or the same error as on the CPU path, and the call goes on."""
    damaged = _damaged_pngs(tmp_path)
    sources = list(damaged.values())
    items = [item for batch in iter_raw_batches(sources, batch_size=4, workers=1) for item in batch]
    assert [read_png(path) for path in sources] == [None, None, None]
    for (_, kind, payload, error), path in zip(items, sources, strict=True):
        try:
            expected = pil_pixels(path)
        except OSError as exc:
            assert (kind, error) == ("error", f"{type(exc).__name__}: {exc}"), path
        else:
            assert kind == "pixels" and torch.equal(payload, expected), path
    assert {item[1] for item in items} == {"pixels", "error"}  # PIL reads one, not all


def test_kept_readers_serve_the_next_call_with_the_same_processes(
    files: list[str], tmp_path: Path
) -> None:
    import multiprocessing

    def read(sources: list) -> list:
        batches = iter_raw_batches(sources, batch_size=4, workers=2, chunk=2, keep_workers=True)
        return [item for batch in batches for item in batch]

    try:
        first = read(files)
        workers = {p.pid for p in multiprocessing.active_children()}
        assert len(workers) == 2  # kept after the call
        missing = str(tmp_path / "missing.png")
        second = read([files[3], missing, files[0]])
        assert {p.pid for p in multiprocessing.active_children()} == workers
    finally:
        close_reader_pool()
    assert [(i, kind) for i, kind, _, _ in first] == [
        (i, read_raw(i, f)[1]) for i, f in enumerate(files)
    ]
    assert [(i, kind) for i, kind, _, _ in second] == [(0, "pixels"), (1, "error"), (2, "jpeg")]
    assert torch.equal(second[0][2], pil_pixels(files[3]))


def test_a_call_left_unfinished_leaves_nothing_for_the_next(files: list[str]) -> None:
    def batches(sources: list) -> Iterator[list]:
        return iter_raw_batches(sources, batch_size=2, workers=2, chunk=1, keep_workers=True)

    try:
        abandoned = batches(files * 4)
        next(abandoned)
        # while it is open, another caller gets readers of its own
        concurrent = [item[0] for b in batches(files[:3]) for item in b]
        abandoned.close()
        after = [(item[0], item[1]) for b in batches(files[:2]) for item in b]
    finally:
        close_reader_pool()
    assert concurrent == [0, 1, 2]
    assert after == [(0, "jpeg"), (1, "jpeg")]


def test_a_cpu_quota_caps_the_reader_count(tmp_path: Path, monkeypatch) -> None:
    """In a pod the node's cores are visible but the CPU limit is what the readers get."""
    import os

    from mm_pipelines.models import common
    from mm_pipelines.models.clip.encode import default_readers

    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, expected in (
        ("max 100000\n", cores),
        ("150000 100000\n", min(cores, 2)),  # 1.5 CPUs: two, each throttled to 3/4
        ("50000 100000\n", 1),
        ("garbled\n", cores),
    ):
        cpu_max.write_text(text)
        assert common.available_cpus(cpu_max) == expected, text
    assert common.available_cpus(tmp_path / "no-cgroup-v2") == cores
    cpu_max.write_text("100000 100000\n")
    monkeypatch.setattr(common, "CGROUP_CPU_MAX", cpu_max)
    assert default_readers() == 1
