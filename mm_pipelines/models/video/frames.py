"""Video frame sampling: plain Python, no Dagster.

One call decodes a video once and takes the frames of every requested strategy from
that single pass:

* without a `scene` strategy the wanted frames are known up front, so the sorted union
  of their indices is read in one forward pass, in batches (decord ``get_batch`` on
  chunks of indices, or PyAV seek-to-keyframe + decode forward); never one seek per
  frame, never a second visit of the same GOP;
* with a `scene` strategy every frame has to be looked at, so one sequential pass
  decodes each frame, scores a small (64 px wide) copy against the previous one, and
  converts to full-resolution RGB only the frames some strategy keeps.

Memory is bounded: `iter_frames` is a generator, so a caller that writes each frame out
as it comes never holds more than the frame in hand (PyAV) or one batch of `batch_size`
frames (decord), plus the decoder's own buffers (tests/ml/test_frames.py checks that
resident memory levels off while 360 frames of 720p stream through).

Decoders sit behind a small interface (`FrameDecoder`; `iter_frames(decoders=...)`):
PyAV and decord. A decoder that cannot open or read a file hands over to the next one
(frames already yielded are not repeated); when all fail, `VideoDecodeError(path,
reason)` is raised. PyAV leads the default order and decord is the fallback, by
measurement (benchmarks/bench_frames.py, 60 s 720p H.264, same run): 16 uniform frames
0.38 s with PyAV vs 1.02 s with decord (OpenCV seek-per-frame baseline 1.91 s), fps=1 40
vs 26 sampled frames/s; PyAV can skip decoding non-reference frames on the way to a target
(`skip_frame=NONREF`, bit-identical output) and can convert only the kept frames to
full-size RGB during a scene scan, while decord has one output size per reader and
converts every frame. decord is also unmaintained and cannot open AV1. Put decord first
with `decoders=("decord", "pyav")` or by changing `DEFAULT_DECODERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import numpy as np

FRAMES_VERSION = "frames_v1"
DEFAULT_DECODERS: tuple[str, ...] = ("pyav", "decord")
SCAN_WIDTH = 64  # width of the copy the scene detector compares; cheap and noise-tolerant
# Decoders that honour skip_frame=NONREF per packet (others, e.g. libdav1d, read it once
# when opened, which would hide wanted non-reference frames).
_NONREF_SKIP_CODECS = frozenset({"h264", "hevc"})
_TIME_EPS = 1e-3  # decord reports float32 times: 1.0 s may come back as 0.99999994

PathLike = str | Path


class VideoDecodeError(Exception):
    """No decoder could read the video; `reason` says what each decoder reported."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


class _DecoderFailure(Exception):
    """One decoder failed on one file; the next decoder may still succeed."""


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Uniform:
    """`n` frames, one per equal slice of the video.

    `keyframe_snap` (0..0.5, a fraction of the slice length): a keyframe that lies this
    close to a slice's centre is taken instead of the exact centre frame, because a
    keyframe costs one decode while a frame deep in a GOP costs up to a GOP of decodes.
    0 gives exact centres. The reported timestamp is always the true one of the frame.
    """

    n: int = 16
    max_frames: int = 64
    keyframe_snap: float = 0.5
    name: ClassVar[str] = "uniform"

    @property
    def version(self) -> str:
        params = f"n={self.n},max={self.max_frames},snap={self.keyframe_snap:g}"
        return f"{FRAMES_VERSION}:uniform:{params}"


@dataclass(frozen=True)
class Fps:
    """One frame every 1/`fps` seconds from t=0; past `max_frames` the step widens so the
    cap still spans the whole video. `keyframe_snap` as for `Uniform` (fraction of the step)."""

    fps: float = 1.0
    max_frames: int = 300
    keyframe_snap: float = 0.5
    name: ClassVar[str] = "fps"

    @property
    def version(self) -> str:
        params = f"fps={self.fps:g},max={self.max_frames},snap={self.keyframe_snap:g}"
        return f"{FRAMES_VERSION}:fps:{params}"


@dataclass(frozen=True)
class Keyframes:
    """The stream's keyframes (evenly thinned past `max_frames`)."""

    max_frames: int = 64
    name: ClassVar[str] = "keyframes"

    @property
    def version(self) -> str:
        return f"{FRAMES_VERSION}:keyframes:max={self.max_frames}"


@dataclass(frozen=True)
class Scene:
    """The first frame of every shot: frame 0, then every frame whose change score against
    the previous frame is >= `threshold` and that comes >= `min_gap_s` after the last cut.

    The score (0..1) is the mean of the mean absolute luma difference and the colour
    histogram distance (16 bins per channel) of 64 px wide copies. On the test video the
    cuts score 0.50-0.57 and motion inside a shot at most 0.04. Fades and dissolves are
    not detected (a frame-to-frame detector sees small steps).
    Past `max_frames` further cuts are dropped (the scan is streaming: it cannot know the
    later cuts when it must decide).
    """

    threshold: float = 0.3
    min_gap_s: float = 0.5
    max_frames: int = 64
    name: ClassVar[str] = "scene"

    @property
    def version(self) -> str:
        return (
            f"{FRAMES_VERSION}:scene:threshold={self.threshold:g},"
            f"min_gap_s={self.min_gap_s:g},max={self.max_frames}"
        )


Strategy = Uniform | Fps | Keyframes | Scene
StrategyName = Literal["uniform", "fps", "keyframes", "scene"]
_STRATEGIES: dict[str, type] = {s.name: s for s in (Uniform, Fps, Keyframes, Scene)}
_ALIASES = {"max": "max_frames", "snap": "keyframe_snap"}


def parse_strategy(spec: str | dict | Strategy) -> Strategy:
    """A strategy from a spec string ("uniform", "uniform:n=8,max=8", "fps:fps=2",
    "scene:threshold=0.4"), a dict ({"name": "fps", "fps": 2}) or a strategy (returned).

    The part of a `version` string after "frames_v1:" parses back to the same strategy.
    """
    if isinstance(spec, Uniform | Fps | Keyframes | Scene):
        return spec
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name")
    else:
        name, _, rest = spec.strip().partition(":")
        params = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown frame strategy {name!r}; expected one of {sorted(_STRATEGIES)}")
    kwargs = {}
    for key, value in params.items():
        key = _ALIASES.get(key, key)
        if key not in cls.__dataclass_fields__:
            raise ValueError(f"unknown parameter {key!r} for frame strategy {name!r}")
        kind = cls.__dataclass_fields__[key].type  # "int" / "float" (postponed annotations)
        kwargs[key] = int(value) if kind == "int" else float(value)
    return cls(**kwargs)


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class VideoInfo:
    """What the sampler needs to know about a video stream, in presentation order."""

    num_frames: int
    fps: float
    frame_times: np.ndarray  # float64 seconds per frame, first frame = 0.0
    keyframes: np.ndarray  # int64 frame indices of keyframes, ascending

    @property
    def duration_s(self) -> float:
        return float(self.frame_times[-1]) + 1.0 / self.fps if self.num_frames else 0.0


@dataclass(frozen=True)
class SampledFrame:
    """One sampled frame. `image` is RGB uint8 HxWx3; `version` keys cached results."""

    strategy: str
    version: str
    frame_index: int
    timestamp_s: float
    image: np.ndarray


@dataclass
class SamplingReport:
    """Filled in by `iter_frames` for the caller's metadata: which decoder read the file,
    what the ones before it reported, and how many frames each strategy (by version)
    produced."""

    decoder: str | None = None
    info: VideoInfo | None = None
    fallbacks: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- decoders


class FrameDecoder(Protocol):
    """An open video. `read` yields (index, RGB frame) for sorted indices; `scan` yields
    (index, small RGB copy, getter of the full RGB frame) for every frame in order."""

    name: str
    info: VideoInfo

    def read(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[int, np.ndarray]]: ...

    def scan(
        self, small_width: int, batch_size: int
    ) -> Iterator[tuple[int, np.ndarray, Callable[[], np.ndarray]]]: ...

    def close(self) -> None: ...


def _small_size(width: int, height: int, small_width: int) -> tuple[int, int]:
    return small_width, max(2, round(small_width * height / width / 2) * 2)


def _downscale(frames: np.ndarray, small_width: int) -> np.ndarray:
    """(B,H,W,3) -> (B,h,w,3): sample a 4x grid, then average 4x4 blocks (cheap anti-alias)."""
    b, height, width, _ = frames.shape
    sw, sh = _small_size(width, height, small_width)
    rows = np.linspace(0, height - 1, sh * 4).round().astype(np.intp)
    cols = np.linspace(0, width - 1, sw * 4).round().astype(np.intp)
    grid = frames[:, rows[:, None], cols[None, :]].astype(np.float32)
    return grid.reshape(b, sh, 4, sw, 4, 3).mean(axis=(2, 4)).astype(np.uint8)


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class _DecordDecoder:
    name = "decord"

    def __init__(self, path: PathLike, num_threads: int = 1) -> None:
        # num_threads=1: with decord's automatic thread count its background decoder
        # runs ahead of get_batch and RSS grows with the video (measured: +570 MB after
        # 960 frames of 720p; dmlc/decord#208, #157); with one thread RSS levels off
        # (160-340 MB for 720p, its frame pools) at the same speed.
        try:
            import decord
        except ImportError as exc:  # decord is unmaintained; a missing wheel is a fallback
            raise _DecoderFailure("decord is not installed") from exc
        self._errors = (decord.DECORDError, RuntimeError)
        try:
            self._reader = decord.VideoReader(str(path), num_threads=num_threads)
            n = len(self._reader)
            if n == 0:
                raise _DecoderFailure("no frames")
            times = self._reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
            keyframes = np.asarray(self._reader.get_key_indices(), dtype=np.int64)
            fps = float(self._reader.get_avg_fps()) or 25.0
        except self._errors as exc:
            raise _DecoderFailure(_first_line(exc)) from exc
        self.info = VideoInfo(n, fps, times - times[0], keyframes)

    def _batch(self, indices: list[int]) -> np.ndarray:
        try:
            return self._reader.get_batch(indices).asnumpy()
        except self._errors as exc:
            raise _DecoderFailure(_first_line(exc)) from exc

    def read(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for chunk in _chunks(indices, batch_size):
            batch = self._batch(chunk)
            yield from zip(chunk, batch, strict=True)

    def scan(
        self, small_width: int, batch_size: int
    ) -> Iterator[tuple[int, np.ndarray, Callable[[], np.ndarray]]]:
        # decord has one output size per reader, so the scan converts every frame at full
        # resolution (about 4x slower than PyAV's scan, which converts only kept frames).
        for chunk in _chunks(range(self.info.num_frames), batch_size):
            batch = self._batch(chunk)
            small = _downscale(batch, small_width)
            for i, index in enumerate(chunk):
                yield index, small[i], (lambda frame=batch[i]: frame)

    def close(self) -> None:
        self._reader = None


class _PyAVDecoder:
    name = "pyav"

    def __init__(self, path: PathLike) -> None:
        import av

        self._av = av
        self._path = str(path)
        self._container = self._open()
        try:
            self.info, self._pts = self._probe()
        except av.FFmpegError as exc:
            raise _DecoderFailure(_first_line(exc)) from exc
        finally:
            self.close()
        self._container = self._open()  # fresh demuxer: rewinding is not possible on all inputs
        self._index = {int(p): i for i, p in enumerate(self._pts)} if self._pts is not None else {}

    def _open(self):
        try:
            container = self._av.open(self._path, metadata_errors="ignore")
        except (self._av.FFmpegError, OSError) as exc:
            raise _DecoderFailure(_first_line(exc)) from exc
        if not container.streams.video:
            container.close()
            raise _DecoderFailure("no video stream")
        return container

    @property
    def _stream(self):
        return self._container.streams.video[0]

    def _probe(self) -> tuple[VideoInfo, np.ndarray | None]:
        """Demux (no decoding) to learn every frame's pts and which frames are keyframes."""
        stream = self._stream
        packets = [  # (pts, is_keyframe) in decode order; size 0 is the final flush packet
            (packet.pts, packet.is_keyframe)
            for packet in self._container.demux(stream)
            if packet.size > 0
        ]
        if not packets:
            raise _DecoderFailure("no frames")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 25.0
        if any(pts is None for pts, _ in packets):  # no timestamps (raw streams): count frames
            n = len(packets)
            keys = np.flatnonzero([key for _, key in packets]).astype(np.int64)
            return VideoInfo(n, fps, np.arange(n) / fps, keys), None
        order = np.unique(np.asarray([pts for pts, _ in packets], dtype=np.int64))
        times = (order - order[0]).astype(np.float64) * float(stream.time_base)
        keys = np.searchsorted(order, [pts for pts, key in packets if key]).astype(np.int64)
        return VideoInfo(len(order), fps, times, np.unique(keys)), order

    def _keyframe_before(self, index: int) -> int:
        keys = self.info.keyframes
        pos = int(np.searchsorted(keys, index, side="right")) - 1
        return int(keys[pos]) if pos >= 0 else 0

    def read(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        try:
            if self._pts is None:
                yield from self._read_sequential(indices)
            else:
                yield from self._read_seeking(indices)
        except self._av.FFmpegError as exc:
            raise _DecoderFailure(_first_line(exc)) from exc

    def _read_seeking(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Seek to the keyframe before the next wanted frame, decode forward, and keep
        going forward while the next wanted frame is in the same GOP."""
        stream = self._stream
        stream.thread_type = "SLICE"  # frame threads add a pipeline delay after every seek
        ctx = stream.codec_context
        skip_unwanted = ctx.name in _NONREF_SKIP_CODECS
        pending = sorted(set(indices))
        wanted = set(pending)
        j = 0
        while j < len(pending):
            self._container.seek(int(self._pts[self._keyframe_before(pending[j])]), stream=stream)
            start_j, last = j, -1
            for packet in self._container.demux(stream):
                # Frames nobody wants and no other frame references need not be decoded
                # (about half of a typical GOP); the output is bit-identical.
                if skip_unwanted:
                    wanted_here = self._index.get(packet.pts) in wanted
                    ctx.skip_frame = "DEFAULT" if wanted_here else "NONREF"
                for frame in stream.decode(packet):
                    index = self._index.get(frame.pts, -1)
                    last = max(last, index)
                    if index in wanted:
                        wanted.discard(index)
                        yield index, frame.to_ndarray(format="rgb24")
                while j < len(pending) and pending[j] not in wanted:
                    j += 1
                if j == len(pending):
                    return
                # Progress made and the next wanted frame lies beyond a keyframe we have not
                # reached: seeking there is cheaper than decoding the rest of this GOP.
                if j > start_j and self._keyframe_before(pending[j]) > last >= 0:
                    break
            else:
                if j == start_j:  # reached the end without producing the next wanted frame
                    raise _DecoderFailure(
                        f"frame {pending[j]} of {self.info.num_frames} is missing"
                    )

    def _read_sequential(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        wanted = set(indices)
        for index, frame in enumerate(self._container.decode(self._stream)):
            if index in wanted:
                wanted.discard(index)
                yield index, frame.to_ndarray(format="rgb24")
                if not wanted:
                    return
        if wanted:
            raise _DecoderFailure(f"frame {min(wanted)} of {self.info.num_frames} is missing")

    def scan(
        self, small_width: int, batch_size: int
    ) -> Iterator[tuple[int, np.ndarray, Callable[[], np.ndarray]]]:
        stream = self._stream
        stream.thread_type = "AUTO"  # one sequential pass: frame threads pay off
        sw, sh = _small_size(stream.width, stream.height, small_width)
        reformatter = self._av.video.reformatter.VideoReformatter()  # reused: caches its context
        try:
            for count, frame in enumerate(self._container.decode(stream)):
                index = count if self._pts is None else self._index.get(frame.pts)
                if index is None:
                    continue
                small = reformatter.reformat(frame, width=sw, height=sh, format="rgb24")
                small = small.to_ndarray()
                yield index, small, (lambda f=frame: f.to_ndarray(format="rgb24"))
        except self._av.FFmpegError as exc:
            raise _DecoderFailure(_first_line(exc)) from exc

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


_DECODERS: dict[str, Callable[[PathLike], FrameDecoder]] = {
    "decord": _DecordDecoder,
    "pyav": _PyAVDecoder,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _open_first(
    path: PathLike, order: Sequence[str], failures: list[str]
) -> Iterator[FrameDecoder]:
    for name in order:
        try:
            yield _DECODERS[name](path)
        except _DecoderFailure as exc:
            failures.append(f"{name}: {exc}")


def probe_video(path: PathLike, decoders: Sequence[str] = DEFAULT_DECODERS) -> VideoInfo:
    """Frame count, fps, per-frame timestamps and keyframes, without decoding frames."""
    failures: list[str] = []
    for decoder in _open_first(path, decoders, failures):
        decoder.close()
        return decoder.info
    raise VideoDecodeError(path, "; ".join(failures))


# --------------------------------------------------------------------------- planning


def _index_at(info: VideoInfo, t: float) -> int:
    """The frame on screen at time t."""
    i = int(np.searchsorted(info.frame_times, t + _TIME_EPS, side="right")) - 1
    return min(max(i, 0), info.num_frames - 1)


def _indices_for_times(info: VideoInfo, targets: np.ndarray, step: float, snap: float) -> list[int]:
    window = min(max(snap, 0.0), 0.5) * step
    key_times = info.frame_times[info.keyframes] if len(info.keyframes) else np.empty(0)
    picked: set[int] = set()
    for t in targets:
        index = _index_at(info, float(t))
        if window > 0 and len(key_times):
            nearest = int(np.abs(key_times - t).argmin())
            key = int(info.keyframes[nearest])
            # a keyframe on the boundary of two windows serves only the first one
            if abs(key_times[nearest] - t) <= window + _TIME_EPS and key not in picked:
                index = key
        picked.add(index)
    return sorted(picked)


def plan_frames(strategy: Strategy, info: VideoInfo) -> list[int]:
    """Frame indices a static strategy takes from a video (`Scene` is decided while
    scanning, so it has no plan)."""
    n, duration = info.num_frames, info.duration_s
    if n == 0:
        return []
    if isinstance(strategy, Uniform):
        count = max(1, min(strategy.n, strategy.max_frames, n))
        step = duration / count
        targets = (np.arange(count) + 0.5) * step
        return _indices_for_times(info, targets, step, strategy.keyframe_snap)
    if isinstance(strategy, Fps):
        step = 1.0 / strategy.fps
        count = max(1, math.ceil((duration - _TIME_EPS) / step))  # targets t < duration
        if count > strategy.max_frames:  # keep the cap spread over the whole video
            count, step = strategy.max_frames, duration / strategy.max_frames
        targets = np.arange(count) * step
        return _indices_for_times(info, targets, step, strategy.keyframe_snap)
    if isinstance(strategy, Keyframes):
        keys = info.keyframes if len(info.keyframes) else np.zeros(1, dtype=np.int64)
        if len(keys) > strategy.max_frames:
            keys = keys[np.linspace(0, len(keys) - 1, strategy.max_frames).round().astype(int)]
        return sorted({int(k) for k in keys})
    raise TypeError(f"{strategy!r} has no static plan")


class _SceneDetector:
    """Streaming hard-cut detector on small RGB copies (see `Scene`)."""

    def __init__(self, strategy: Scene) -> None:
        self.strategy = strategy
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self._last_cut = -math.inf
        self._count = 0

    @staticmethod
    def _features(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        luma = small.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        hist = np.stack([np.bincount(small[..., c].ravel() >> 4, minlength=16) for c in range(3)])
        return luma, hist / hist.sum(axis=1, keepdims=True)

    def update(self, t: float, small: np.ndarray) -> bool:
        """Feed the next frame; True when it starts a new shot (and is within the cap)."""
        features = self._features(small)
        previous, self._previous = self._previous, features
        if previous is None:
            score = 1.0  # the first frame starts the first shot
        else:
            pixel = float(np.abs(features[0] - previous[0]).mean()) / 255.0
            hist = float(np.abs(features[1] - previous[1]).sum(axis=1).mean()) / 2.0
            score = (pixel + hist) / 2.0
        is_cut = (
            score >= self.strategy.threshold
            and t - self._last_cut >= self.strategy.min_gap_s - _TIME_EPS
            and self._count < self.strategy.max_frames
        )
        if is_cut:
            self._last_cut = t
            self._count += 1
        return is_cut


# --------------------------------------------------------------------------- sampling


def _sample(
    decoder: FrameDecoder, strategies: Sequence[Strategy], batch_size: int
) -> Iterator[SampledFrame]:
    info = decoder.info
    static: dict[int, list[Strategy]] = {}
    for strategy in strategies:
        if not isinstance(strategy, Scene):
            for index in plan_frames(strategy, info):
                static.setdefault(index, []).append(strategy)
    scenes = [_SceneDetector(s) for s in strategies if isinstance(s, Scene)]

    def emit(keep: Iterable[Strategy], index: int, image: np.ndarray) -> Iterator[SampledFrame]:
        t = float(info.frame_times[index])
        for strategy in keep:
            yield SampledFrame(strategy.name, strategy.version, index, t, image)

    if not scenes:
        for index, image in decoder.read(sorted(static), batch_size):
            yield from emit(static[index], index, image)
        return

    remaining = set(static)
    for index, small, full in decoder.scan(SCAN_WIDTH, batch_size):
        t = float(info.frame_times[index])
        cuts = [d.strategy for d in scenes if d.update(t, small)]  # every detector sees every frame
        keep = static.get(index, []) + cuts
        if keep:
            remaining.discard(index)
            yield from emit(keep, index, full())
    if remaining:
        raise _DecoderFailure(f"frame {min(remaining)} of {info.num_frames} is missing")


def iter_frames(
    path: PathLike,
    strategies: Sequence[Strategy | str | dict],
    *,
    batch_size: int = 8,
    decoders: Sequence[str] | None = None,
    report: SamplingReport | None = None,
) -> Iterator[SampledFrame]:
    """Sample one video with every strategy in one decoding pass, yielding frames as they
    are decoded (ascending frame index; one `SampledFrame` per strategy that wants it,
    sharing the image array). Memory: about `batch_size` full-resolution frames.

    `decoders` overrides the decoder order (names: "pyav", "decord"). If a decoder fails
    part-way, the next one takes over and frames already yielded are not repeated.
    `report`, if given, is filled in as sampling goes (decoder used, fallbacks, counts).
    Raises `VideoDecodeError` when no decoder can read the video; frames yielded before
    a late failure of the last decoder have then been yielded already.
    """
    chosen = [parse_strategy(s) for s in strategies]
    order = tuple(decoders) if decoders else DEFAULT_DECODERS
    report = report if report is not None else SamplingReport()
    failures = report.fallbacks
    done: set[tuple[str, int]] = set()
    for decoder in _open_first(path, order, failures):
        report.decoder, report.info = decoder.name, decoder.info
        try:
            for frame in _sample(decoder, chosen, batch_size):
                key = (frame.version, frame.frame_index)
                if key not in done:
                    done.add(key)
                    report.counts[frame.version] = report.counts.get(frame.version, 0) + 1
                    yield frame
            return
        except _DecoderFailure as exc:
            failures.append(f"{decoder.name}: {exc}")
        finally:
            decoder.close()
    raise VideoDecodeError(path, "; ".join(failures) or "no decoder configured")


def sample_frames(
    path: PathLike, strategies: Sequence[Strategy | str | dict], **kwargs
) -> list[SampledFrame]:
    """`iter_frames` collected into a list (holds every sampled frame: fine for a few
    dozen frames, use `iter_frames` to stream)."""
    return list(iter_frames(path, strategies, **kwargs))


# --------------------------------------------------------------------------- images
