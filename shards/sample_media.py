"""Small real media files in the shapes the shard builder meets, written with PyAV: for tests, benchmarks, demos.

Each file carries a time code the builder's output can be checked against. In every frame the left half is a
flat grey whose level rises linearly with the frame's timestamp (:func:`grey_level`), and the right half is a
coloured square moving over a gradient (content that compresses like video, not like a flat card). Audio
channel ``c`` is a sine of ``300 * (c + 1)`` Hz whose amplitude rises linearly with time
(:func:`tone_amplitude`), so the channel rule (first or mean) and the cut position can both be measured.

:func:`write_media` writes one file from a :class:`MediaSpec` (codec, container, size, frame rate or variable
frame rate, sample rate, channel layout, durations); :func:`write_broken` writes the bad inputs (truncated,
non-media, zero-length) next to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VIDEO_ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "hevc": "libx265", "mpeg4": "mpeg4", "vp8": "libvpx"}
AUDIO_ENCODERS = {"aac": "aac", "opus": "libopus", "flac": "flac", "mp3": "libmp3lame", "pcm": "pcm_s16le"}
VFR_TIME_BASE = Fraction(1, 1000)


@dataclass(frozen=True)
class MediaSpec:
    """One source file to write. ``video=None`` makes an audio-only file, ``audio=None`` a video-only one."""

    video: str | None = "h264"
    """Video codec: a key of VIDEO_ENCODERS, or None."""
    audio: str | None = "aac"
    """Audio codec: a key of AUDIO_ENCODERS, or None."""
    width: int = 96
    height: int = 64
    fps: float = 25.0
    """Nominal frame rate (a float: 23.976 and 29.97 are written as 24000/1001 and 30000/1001)."""
    vfr: bool = False
    """Variable frame rate: frame intervals drawn from [0.4, 1.6] / fps, timestamps in milliseconds."""
    duration: float = 2.0
    """Seconds of video."""
    audio_duration: float | None = None
    """Seconds of audio (default: ``duration``)."""
    sample_rate: int = 48000
    layout: str = "stereo"
    """FFmpeg channel layout: 'mono', 'stereo', '5.1' ..."""
    rotation: int = 0
    """Display rotation (degrees counter-clockwise) stored in the container, as phones do for portrait video."""
    seed: int = 0

    @property
    def audio_seconds(self) -> float:
        return self.duration if self.audio_duration is None else self.audio_duration


def grey_level(t: float | np.ndarray, duration: float) -> float | np.ndarray:
    """Grey level (0-255) of the left half of a frame shown at ``t`` seconds in a file of ``duration``."""
    return 20.0 + 200.0 * np.clip(t, 0.0, duration) / duration


def tone_amplitude(t: float | np.ndarray, duration: float) -> float | np.ndarray:
    """Peak amplitude (of 1.0) of every channel's tone at ``t`` seconds in a file of ``duration`` seconds."""
    return 0.1 + 0.5 * np.clip(t, 0.0, duration) / duration


def _rate(fps: float) -> Fraction:
    for exact in (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001)):
        if abs(float(exact) - fps) < 1e-3:
            return exact
    return Fraction(fps).limit_denominator(1000)


def frame_times(spec: MediaSpec) -> list[float]:
    """Timestamps (seconds) of the frames :func:`write_media` writes for ``spec`` (jittered when ``vfr``)."""
    if not spec.vfr:
        rate = _rate(spec.fps)
        n = int(spec.duration * rate + Fraction(1, 2))
        return [float(i / rate) for i in range(n)]
    rng = np.random.default_rng(spec.seed)
    times, t = [], 0.0
    while t < spec.duration - 1e-9:
        times.append(round(t, 3))
        t += rng.uniform(0.4, 1.6) / spec.fps
    return times


def _picture(spec: MediaSpec, t: float) -> np.ndarray:
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
    img[..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
    img[..., 2] = 96
    side = max(4, min(h, w) // 4)
    cx = int((0.5 + 0.4 * np.sin(2 * np.pi * t / max(spec.duration, 1e-3))) * (w - side))
    cy = int((0.5 + 0.4 * np.cos(2 * np.pi * t / max(spec.duration, 1e-3))) * (h - side))
    img[cy : cy + side, cx : cx + side] = (230, 40, 40)
    img[:, : w // 2] = int(round(float(grey_level(t, spec.duration))))
    return img


def _tones(spec: MediaSpec) -> np.ndarray:
    channels = len(av.AudioLayout(spec.layout).channels)
    n = int(round(spec.audio_seconds * spec.sample_rate))
    t = np.arange(n) / spec.sample_rate
    amp = tone_amplitude(t, spec.audio_seconds)
    return np.stack([amp * np.sin(2 * np.pi * 300 * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def write_media(path: str | os.PathLike, spec: MediaSpec) -> Path:
    """Write ``spec`` to ``path``; the container follows the suffix (.mp4, .webm, .mkv, .mov, .m4a, .ogg ...)."""
    path = Path(path)
    if spec.video is None and spec.audio is None:
        raise ValueError("MediaSpec needs a video or an audio codec")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "mp4" if path.suffix == ".m4a" else None
    with av.open(str(path), mode="w", format=fmt) as container:
        vstream = astream = None
        if spec.video is not None:
            rate = _rate(spec.fps)
            vstream = container.add_stream(VIDEO_ENCODERS[spec.video], rate=rate)
            vstream.width, vstream.height, vstream.pix_fmt = spec.width, spec.height, "yuv420p"
            vstream.time_base = VFR_TIME_BASE if spec.vfr else 1 / rate
            vstream.codec_context.time_base = vstream.time_base
            vstream.codec_context.thread_count = 1
            if spec.rotation:
                vstream.set_display_rotation(spec.rotation)
            if spec.video == "hevc":
                vstream.options = {"x265-params": "log-level=none"}
        if spec.audio is not None:
            astream = container.add_stream(AUDIO_ENCODERS[spec.audio], rate=spec.sample_rate, layout=spec.layout)
        if vstream is not None:
            for i, t in enumerate(frame_times(spec)):
                frame = av.VideoFrame.from_ndarray(_picture(spec, t), format="rgb24")
                frame.pts = int(round(t * 1000)) if spec.vfr else i
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))
        if astream is not None:
            tones = _tones(spec)
            step = 1024
            for start in range(0, tones.shape[1], step):
                chunk = np.ascontiguousarray(tones[:, start : start + step])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=spec.layout)
                frame.sample_rate = spec.sample_rate
                frame.pts = start
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))
    return path


def write_broken(path: str | os.PathLike, kind: str, source: str | os.PathLike | None = None) -> Path:
    """Write a bad input: ``truncated`` (the first 60 % of ``source``), ``text`` (not media) or ``empty`` (0 bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        if source is None:
            raise ValueError("write_broken('truncated') needs the source file to cut")
        data = Path(source).read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "text":
        path.write_text("this is a text file that happens to be called .mp4\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(f"broken kind {kind!r}: choose truncated, text or empty")
    return path
