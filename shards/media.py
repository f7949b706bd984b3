"""Encoding and decoding of shard members with PyAV (FFmpeg's libraries; no ffmpeg binary is run).

Shard video is an mp4 with one video stream and no audio track: VP9 by default (DALI decodes it on the
CPU and on the GPU) or H.264 (GPU only), constant frame rate, yuv420p, a keyframe every
``keyframe_interval`` frames so that random access decodes at most that many frames. Shard audio is
16-bit FLAC (or WAV), mono. Encoding runs single-threaded per clip (parallelism comes from clip-level
workers) which also makes the bytes reproducible.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

VIDEO_CODECS = {"vp9": "libvpx-vp9", "h264": "libx264"}
AUDIO_FORMATS = ("flac", "wav")


@dataclass(frozen=True)
class VideoEncoding:
    codec: str = "vp9"
    """'vp9' (decodes on DALI CPU and GPU) or 'h264' (DALI GPU only)."""
    fps: int = 8
    keyframe_interval: int = 8
    """Frames between keyframes; random access decodes at most this many frames."""
    crf: int = 32
    """Constant quality (lower is better; vp9 0-63, h264 0-51)."""
    speed: int = 8
    """Encoder speed preset: vp9 cpu-used 0-8 (8 fastest); for h264 mapped to x264 presets."""

    def __post_init__(self) -> None:
        if self.codec not in VIDEO_CODECS:
            raise ValueError(f"video codec {self.codec!r}: choose one of {', '.join(VIDEO_CODECS)}")
        if self.fps <= 0 or self.keyframe_interval <= 0:
            raise ValueError(f"fps ({self.fps}) and keyframe_interval ({self.keyframe_interval}) must be > 0")


_X264_PRESETS = ["veryslow", "slower", "slow", "medium", "fast", "faster", "veryfast", "superfast", "ultrafast"]


def encode_video(frames: np.ndarray, enc: VideoEncoding = VideoEncoding()) -> bytes:
    """Encode RGB frames (T, H, W, 3) uint8 into an mp4 held in memory (no audio track)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h}: yuv420p needs even sides")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(VIDEO_CODECS[enc.codec], rate=enc.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = Fraction(1, enc.fps)
        ctx = stream.codec_context
        ctx.gop_size = enc.keyframe_interval
        ctx.thread_count = 1
        if enc.codec == "vp9":
            stream.options = {
                "deadline": "realtime" if enc.speed >= 5 else "good",
                "cpu-used": str(enc.speed),
                "crf": str(enc.crf),
                "b:v": "0",
                "row-mt": "0",
                "lag-in-frames": "0",
                "keyint_min": str(enc.keyframe_interval),
            }
        else:
            preset = _X264_PRESETS[min(enc.speed, len(_X264_PRESETS) - 1)]
            stream.options = {"preset": preset, "crf": str(enc.crf), "bf": "0", "threads": "1"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = "flac") -> bytes:
    """Encode mono int16 samples (N,) as 16-bit FLAC or WAV held in memory."""
    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"audio format {fmt!r}: choose one of {', '.join(AUDIO_FORMATS)}")
    if samples.ndim != 1 or samples.dtype != np.int16:
        raise ValueError(f"audio must be mono int16 (N,), got {samples.shape} {samples.dtype}")
    buf = io.BytesIO()
    codec = "flac" if fmt == "flac" else "pcm_s16le"
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        stream.codec_context.format = "s16"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_video(data: bytes) -> np.ndarray:
    """All frames of an in-memory video as (T, H, W, 3) uint8 RGB."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("video has no decodable frames")
    return np.stack(frames)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """An in-memory audio file as float32 samples in [-1, 1] of its first channel, and its sample rate."""
    chunks = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            if arr.dtype == np.int16:
                arr = arr.astype(np.float32) / 32768.0
            if frame.format.is_planar:
                chunks.append(arr[0].astype(np.float32))
            else:  # interleaved (1, N*C)
                chunks.append(arr.reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32))
    if not chunks:
        raise ValueError("audio has no decodable samples")
    return np.concatenate(chunks), rate
