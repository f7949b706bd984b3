"""One clip of the shard builder: probe the source, cut the segment, re-encode it into ``KEY.mp4/.flac/.json``.

Everything goes through PyAV (FFmpeg's libraries in-process; no ffmpeg or ffprobe binary). The rules:

- **Streams.** The first video stream that is not cover art, and the first audio stream (of the same file, or
  of a separate audio file when the job names one). A file without either is rejected.
- **Time.** Seconds are counted from the container's start time, so that ``start`` means the same for the
  video and the audio stream (they may begin at different timestamps). The segment is
  ``[start, start + duration)``.
- **Video.** Output frame ``i`` shows the source frame on screen at ``start + (i + 0.5) / fps`` (the latest
  frame whose timestamp is not later), which resamples constant and variable frame rates alike. The frame is
  turned upright (display-matrix rotation), resized with its short side to ``size`` (bilinear, honouring a
  non-square sample aspect ratio), centre-cropped to ``size x size``, and encoded by
  :func:`shards.media.encode_video` (no audio track).
- **Audio.** Decoded, resampled to ``sample_rate`` by PyAV's ``AudioResampler`` (all channels kept), then
  reduced to mono by ``channel_rule``: ``first`` keeps the first channel (CAV-MAE's ``sox remix 1``),
  ``mean`` averages the channels. Written as 16-bit FLAC (or WAV, ``--audio-format wav``) by
  :func:`shards.media.encode_audio`.
- **Short clips.** Video or audio covering less than ``min_duration`` seconds of the segment is rejected.
  Above that, ``short_clips="pad"`` pads to the full ``duration`` (the last frame is held, the audio is
  zero-filled; the JSON field ``padded`` says how many seconds), and ``short_clips="keep"`` writes the clip at
  the length both streams cover.

:func:`process_clip` never raises for a bad input: it returns a :class:`ClipResult` holding either the sample
or a rejection code and a reason a user can act on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from shards.media import AUDIO_FORMATS, VIDEO_CODECS, VideoEncoding, encode_audio, encode_video
from shards.writer import Sample

CHANNEL_RULES = ("first", "mean")
SHORT_CLIP_RULES = ("pad", "keep")
AUDIO_STOP_MARGIN = 0.1
"""Seconds of audio decoded past the segment's end before stopping (the resampler's filter needs a tail)."""


class ClipRejected(Exception):
    """A source clip cannot be used; ``code`` is a short category, ``reason`` the sentence for the user."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ClipParams:
    """How every clip is cut and encoded (recorded in the manifest's ``preprocessing``)."""

    fps: int = 8
    size: int = 256
    """Side of the square output frames in pixels (even)."""
    codec: str = "vp9"
    """'vp9' (DALI decodes it on CPU and GPU) or 'h264' (DALI GPU only)."""
    keyframe_interval: int = 8
    crf: int = 32
    speed: int = 8
    duration: float = 10.0
    """Seconds per clip."""
    min_duration: float | None = None
    """Clips whose video or audio covers less than this many seconds are rejected (default: duration / 2)."""
    short_clips: str = "pad"
    """'pad' (to ``duration``: last frame held, audio zero-filled) or 'keep' (the clip's own length)."""
    sample_rate: int = 16000
    channel_rule: str = "first"
    """'first' (the first channel, as CAV-MAE) or 'mean' (all channels averaged)."""
    audio_format: str = "flac"
    """16-bit 'flac' (a third of the size) or 'wav' (cheaper to decode)."""

    def __post_init__(self) -> None:
        problems = []
        if self.fps < 1:
            problems.append(f"--fps {self.fps}: must be at least 1")
        if self.size < 16 or self.size % 2:
            problems.append(f"--size {self.size}: must be even and at least 16")
        if self.codec not in VIDEO_CODECS:
            problems.append(f"--codec {self.codec!r}: choose one of {', '.join(VIDEO_CODECS)}")
        if self.keyframe_interval < 1:
            problems.append(f"--keyframe-interval {self.keyframe_interval}: must be at least 1")
        if self.duration <= 0 or self.duration * self.fps < 1:
            problems.append(f"--duration {self.duration}: must hold at least one frame at {self.fps} fps")
        if self.min_duration is not None and not 0 < self.min_duration <= self.duration:
            problems.append(f"--min-duration {self.min_duration}: must be in (0, --duration {self.duration}]")
        if self.short_clips not in SHORT_CLIP_RULES:
            problems.append(f"--short-clips {self.short_clips!r}: choose one of {', '.join(SHORT_CLIP_RULES)}")
        if self.sample_rate < 8000:
            problems.append(f"--sample-rate {self.sample_rate}: must be at least 8000")
        if self.audio_format not in AUDIO_FORMATS:
            problems.append(f"--audio-format {self.audio_format!r}: choose one of {', '.join(AUDIO_FORMATS)}")
        if self.channel_rule not in CHANNEL_RULES:
            problems.append(f"--channel-rule {self.channel_rule!r}: choose one of {', '.join(CHANNEL_RULES)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def min_seconds(self) -> float:
        return self.duration / 2 if self.min_duration is None else self.min_duration

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.duration * self.fps)))

    @property
    def num_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))

    def encoding(self) -> VideoEncoding:
        return VideoEncoding(
            codec=self.codec, fps=self.fps, keyframe_interval=self.keyframe_interval, crf=self.crf, speed=self.speed
        )

    def preprocessing(self) -> dict[str, Any]:
        """The manifest's ``preprocessing`` block for clips made with these parameters."""
        return {
            "video_codec": self.codec,
            "fps": self.fps,
            "frame_size": self.size,
            "keyframe_interval": self.keyframe_interval,
            "crf": self.crf,
            "encoder_speed": self.speed,
            "resize": "short side bilinear, centre crop, display rotation applied",
            "audio_format": self.audio_format,
            "sample_rate": self.sample_rate,
            "audio_channels": 1,
            "channel_rule": self.channel_rule,
            "bits_per_sample": 16,
            "clip_duration": self.duration,
            "min_duration": self.min_seconds,
            "short_clips": self.short_clips,
        }


@dataclass(frozen=True)
class ClipJob:
    """One planned clip: where it comes from and what its metadata says."""

    key: str
    index: int
    source: str
    """How the user names the clip (a path relative to the input, with the CSV row for CSV inputs)."""
    path: str
    """Absolute path of the file holding the video (and the audio, unless ``audio_path`` is set)."""
    start: float
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    category: str
    task: str
    split: str
    audio_path: str | None = None


@dataclass(frozen=True)
class ClipResult:
    """What became of a job: a sample, or a rejection (``code``, ``reason``)."""

    key: str
    sample: Sample | None = None
    code: str | None = None
    reason: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Opening and probing
# ---------------------------------------------------------------------------------------------------------------------

_SIGNATURES = (
    (4, b"ftyp", "MP4/MOV"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"FLV", "FLV"),
    (0, b"OggS", "Ogg"),
    (0, b"fLaC", "FLAC"),
    (0, b"ID3", "MP3"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x30\x26\xb2\x75", "ASF/WMV"),
    (8, b"AVI ", "AVI"),
    (8, b"WAVE", "WAV"),
    (4, b"mdat", "MP4/MOV"),
    (4, b"moov", "MP4/MOV"),
    (4, b"free", "MP4/MOV"),
)


def _sniff(path: str) -> str | None:
    """The container family a file's first bytes announce, or None when they look like no media file."""
    try:
        with open(path, "rb") as f:
            head = f.read(192)
    except OSError:
        return None
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return "MPEG-TS"
    return None


def _ffmpeg_message(err: BaseException) -> str:
    """FFmpeg's words for an error, without PyAV's errno prefix and the file name it repeats."""
    text = getattr(err, "strerror", None) or str(err)
    return str(text).strip()


def check_file(path: str) -> None:
    """Reject a file that is missing, unreadable or empty (cheap: no decoding)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ClipRejected("missing", f"file not found: {path}") from None
    except OSError as err:
        raise ClipRejected("unreadable", f"cannot read {path}: {err.strerror or err}") from None
    if not os.path.isfile(path):
        raise ClipRejected("unreadable", f"not a regular file: {path}")
    if size == 0:
        raise ClipRejected("empty", "empty file (0 bytes)")


def open_media(path: str) -> av.container.InputContainer:
    """Open ``path`` for decoding or raise :class:`ClipRejected` saying why it cannot be read."""
    check_file(path)
    try:
        return av.open(path, mode="r")
    except av.error.InvalidDataError as err:
        family = _sniff(path)
        if family is None:
            raise ClipRejected("not_media", f"not a media file FFmpeg can read ({_ffmpeg_message(err)})") from None
        raise ClipRejected(
            "corrupt", f"corrupt or truncated {family} file: FFmpeg cannot parse it ({_ffmpeg_message(err)})"
        ) from None
    except av.error.PermissionError:
        raise ClipRejected("unreadable", f"permission denied: {path}") from None
    except (av.FFmpegError, OSError) as err:
        raise ClipRejected("unreadable", f"FFmpeg cannot open the file ({_ffmpeg_message(err)})") from None


def video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The first video stream that is a real video (not an attached cover picture)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _rate(stream: av.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def probe(path: str | os.PathLike) -> dict[str, Any]:
    """What a source file holds (container, duration, video and audio stream parameters).

    Raises :class:`ClipRejected` for a file that cannot be opened; a missing stream is reported as None.
    """
    with open_media(str(path)) as container:
        info: dict[str, Any] = {
            "path": str(path),
            "format": container.format.name,
            "duration": None if container.duration is None else container.duration / av.time_base,
            "video": None,
            "audio": None,
        }
        v = video_stream(container)
        if v is not None:
            cc = v.codec_context
            info["video"] = {
                "codec": cc.codec.canonical_name,
                "width": cc.width,
                "height": cc.height,
                "fps": None if _rate(v) is None else round(_rate(v), 3),
                "duration": None if v.duration is None else float(v.duration * v.time_base),
            }
        if container.streams.audio:
            a = container.streams.audio[0]
            cc = a.codec_context
            info["audio"] = {
                "codec": cc.codec.canonical_name,
                "sample_rate": cc.sample_rate,
                "channels": cc.channels,
                "layout": cc.layout.name,
                "duration": None if a.duration is None else float(a.duration * a.time_base),
            }
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Decoding a segment
# ---------------------------------------------------------------------------------------------------------------------


def _origin(container: av.container.InputContainer) -> float:
    return 0.0 if container.start_time is None else container.start_time / av.time_base


def _frame_time(frame: av.frame.Frame, fallback: float) -> float:
    time = frame.time  # float seconds from pts (None without one)
    if time is not None:
        return time
    if frame.dts is not None and frame.time_base is not None:
        return frame.dts * float(frame.time_base)
    return fallback


class _VideoCollector:
    """Picks, converts and keeps the output frames from the decoded frames of one stream (any frame rate)."""

    def __init__(self, stream: av.VideoStream, seg0: float, params: ClipParams) -> None:
        self.size = params.size
        self.targets = seg0 + (np.arange(params.num_frames) + 0.5) / params.fps
        self.seg0 = seg0
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        self.sar = float(sar) if sar else 1.0
        rate = _rate(stream)
        self.nominal_interval = 1.0 / rate if rate else 1.0 / params.fps
        self.reformatter = VideoReformatter()  # keeps its scaler between frames (a new one per frame is 30x slower)
        self.frames: list[np.ndarray] = []
        self.prev: av.VideoFrame | None = None
        self.prev_time = 0.0
        self.prev_rgb: np.ndarray | None = None
        self.intervals: list[float] = []
        self.end: float | None = None
        self.decoded = 0

    @property
    def done(self) -> bool:
        return len(self.frames) >= len(self.targets)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = frame.width, frame.height
        dw = w * self.sar  # display width for non-square pixels
        scale = self.size / min(dw, h)
        rw, rh = max(self.size, int(round(dw * scale))), max(self.size, int(round(h * scale)))
        rgb = self.reformatter.reformat(frame, width=rw, height=rh, format="rgb24", interpolation="BILINEAR")
        rgb = rgb.to_ndarray()
        y0, x0 = (rh - self.size) // 2, (rw - self.size) // 2
        rgb = rgb[y0 : y0 + self.size, x0 : x0 + self.size]
        turns = int(round((frame.rotation or 0) / 90)) % 4  # counter-clockwise, as FFmpeg's display matrix
        return np.ascontiguousarray(np.rot90(rgb, turns) if turns else rgb)

    def _emit_prev(self) -> None:
        if self.prev_rgb is None:
            assert self.prev is not None
            self.prev_rgb = self._convert(self.prev)
        self.frames.append(self.prev_rgb)

    def feed(self, frame: av.VideoFrame) -> None:
        t = _frame_time(frame, self.prev_time + self.nominal_interval if self.prev is not None else self.seg0)
        self.decoded += 1
        if self.prev is None:
            self.prev, self.prev_time = frame, t  # frames before the first one hold the first one
        elif t > self.prev_time:
            self.intervals.append(t - self.prev_time)
        while not self.done and self.targets[len(self.frames)] < t:
            self._emit_prev()
        if self.prev is not frame and not self.done:
            self.prev, self.prev_time, self.prev_rgb = frame, max(t, self.prev_time), None
        if frame.duration and frame.time_base is not None:
            last = frame.duration * float(frame.time_base)
        elif self.intervals:
            last = float(np.median(self.intervals[-16:]))
        else:
            last = self.nominal_interval
        self.end = max(self.end or t, t + last)

    def finish(self) -> tuple[list[np.ndarray], float]:
        """The frames whose time the video covers, and the seconds of the segment it covers."""
        if self.prev is None or self.end is None:
            return [], 0.0
        while not self.done and self.targets[len(self.frames)] < self.end:
            self._emit_prev()
        return self.frames, max(0.0, self.end - self.seg0)


class _AudioCollector:
    """Resamples the decoded audio of one stream and keeps every channel until the segment's end."""

    def __init__(self, seg0: float, seg1: float, params: ClipParams) -> None:
        self.seg0, self.seg1 = seg0, seg1
        self.rate = params.sample_rate
        self.resampler = av.AudioResampler(format="fltp", rate=params.sample_rate)
        self.chunks: list[np.ndarray] = []
        self.t0: float | None = None
        self.done = False

    def feed(self, frame: av.AudioFrame) -> None:
        t = _frame_time(frame, self.seg0 if self.t0 is None else self.t0)
        if self.t0 is None:
            self.t0 = t
        try:
            resampled = self.resampler.resample(frame)
        except ValueError:  # PyAV's resampler is set up by the first frame
            raise ClipRejected(
                "decode_error", f"the audio changes format, layout or rate at {t - self.seg0:.2f} s into the segment"
            ) from None
        for out in resampled:
            self.chunks.append(out.to_ndarray())
        if t > self.seg1 + AUDIO_STOP_MARGIN:
            self.done = True

    def finish(self, channel_rule: str, num_samples: int) -> tuple[np.ndarray, float]:
        """Mono float32 samples from the segment's start (at most ``num_samples``), and the seconds covered."""
        if self.t0 is None:
            return np.zeros(0, np.float32), 0.0
        for out in self.resampler.resample(None):
            self.chunks.append(out.to_ndarray())
        chunks = [c for c in self.chunks if c.size]
        if not chunks:
            return np.zeros(0, np.float32), 0.0
        audio = np.concatenate(chunks, axis=1)
        mono = audio[0] if channel_rule == "first" else audio.mean(axis=0)
        offset = int(round((self.seg0 - self.t0) * self.rate))
        if offset >= 0:
            mono = mono[offset : offset + num_samples]
        else:  # the audio starts after the segment: silence until it does
            mono = np.concatenate([np.zeros(-offset, np.float32), mono])[:num_samples]
        covered = (len(mono) - max(0, -offset)) / self.rate
        return mono.astype(np.float32), max(0.0, covered)


def _decode(
    container: av.container.InputContainer,
    vstream: av.VideoStream | None,
    astream: av.AudioStream | None,
    start: float,
    params: ClipParams,
) -> tuple[_VideoCollector | None, _AudioCollector | None]:
    seg0 = _origin(container) + start
    seg1 = seg0 + params.duration
    vcol = _VideoCollector(vstream, seg0, params) if vstream is not None else None
    acol = _AudioCollector(seg0, seg1, params) if astream is not None else None
    streams = [s for s in (vstream, astream) if s is not None]
    for s in streams:
        s.codec_context.thread_count = 1  # parallelism comes from clip workers
    if start > 0:
        try:
            container.seek(int(seg0 * av.time_base), backward=True, any_frame=False)
        except av.FFmpegError:
            pass  # unseekable input: decode from the beginning; frames before the segment are skipped
    where = {"video": 0.0, "audio": 0.0}
    seconds_per_tick = {s.type: float(s.time_base or 0) for s in streams}
    origin = _origin(container)
    for packet in container.demux(streams):
        kind = packet.stream.type
        collector = vcol if kind == "video" else acol
        if collector is None or collector.done:
            if all(c is None or c.done for c in (vcol, acol)):
                break
            continue
        if packet.pts is not None:
            where[kind] = packet.pts * seconds_per_tick[kind] - origin
        try:
            frames = packet.decode()
        except av.FFmpegError as err:
            raise ClipRejected(
                "decode_error", f"{kind} stream cannot be decoded at {where[kind]:.2f} s ({_ffmpeg_message(err)})"
            ) from None
        for frame in frames:
            collector.feed(frame)
            if collector.done:
                break
    return vcol, acol


def process_clip(job: ClipJob, params: ClipParams) -> ClipResult:
    """Probe, cut and encode one clip; a bad input becomes a rejection, never an exception."""
    try:
        return _process(job, params)
    except ClipRejected as rej:
        return ClipResult(job.key, code=rej.code, reason=rej.reason)
    except av.FFmpegError as err:
        return ClipResult(job.key, code="decode_error", reason=f"FFmpeg failed on it ({_ffmpeg_message(err)})")
    except MemoryError:
        return ClipResult(job.key, code="internal", reason="out of memory while processing it")
    except Exception as err:  # one clip's surprise must not stop the build: it is reported with its type
        return ClipResult(job.key, code="internal", reason=f"unexpected error while processing it: {err!r}")


def _process(job: ClipJob, params: ClipParams) -> ClipResult:
    source_info: dict[str, Any] = {}
    with open_media(job.path) as container:
        vstream = video_stream(container)
        if vstream is None:
            what = "an audio-only file" if container.streams.audio else "no audio stream either"
            raise ClipRejected("no_video", f"no video stream ({what})")
        astream = None
        if job.audio_path is None:
            if not container.streams.audio:
                raise ClipRejected("no_audio", "no audio stream (a video-only file)")
            astream = container.streams.audio[0]
        source_info["video_codec"] = vstream.codec_context.codec.canonical_name
        source_info["width"] = vstream.codec_context.width
        source_info["height"] = vstream.codec_context.height
        rate = _rate(vstream)
        source_info["fps"] = None if rate is None else round(rate, 3)
        vcol, acol = _decode(container, vstream, astream, job.start, params)
    if job.audio_path is not None:
        with open_media(job.audio_path) as audio_container:
            if not audio_container.streams.audio:
                raise ClipRejected("no_audio", f"no audio stream in the audio file {job.audio_path}")
            astream = audio_container.streams.audio[0]
            _, acol = _decode(audio_container, None, astream, job.start, params)
            source_info.update(_audio_info(astream))
    else:
        source_info.update(_audio_info(astream))
    assert vcol is not None and acol is not None

    frames, video_seconds = vcol.finish()
    audio, audio_seconds = acol.finish(params.channel_rule, params.num_samples)
    need = params.min_seconds
    if not frames or video_seconds < need - 1e-6:
        raise ClipRejected(
            "too_short",
            f"too short: the video covers {video_seconds:.2f} s from {job.start:g} s, need at least {need:g} s "
            f"(--min-duration; {vcol.decoded} frames decoded)",
        )
    if audio_seconds < need - 1e-6:
        raise ClipRejected(
            "too_short",
            f"audio too short: it covers {audio_seconds:.2f} s from {job.start:g} s, need at least {need:g} s "
            f"(--min-duration)",
        )
    covered = min(video_seconds, audio_seconds, params.duration)
    if params.short_clips == "pad":
        duration = params.duration
        num_frames, num_samples = params.num_frames, params.num_samples
    else:
        duration = round(covered, 6)
        num_frames = max(1, min(len(frames), int(np.floor(covered * params.fps + 0.5))))
        num_samples = int(round(covered * params.sample_rate))
    frames = frames[:num_frames] + [frames[-1]] * (num_frames - len(frames))
    audio = audio[:num_samples]
    if len(audio) < num_samples:
        audio = np.concatenate([audio, np.zeros(num_samples - len(audio), np.float32)])
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)

    meta = {
        "key": job.key,
        "index": job.index,
        "source": job.source,
        "labels": list(job.labels),
        "label_names": list(job.label_names),
        "category": job.category,
        "task": job.task,
        "split": job.split,
        "duration": duration,
        "fps": params.fps,
        "num_frames": num_frames,
        "sample_rate": params.sample_rate,
        "num_samples": num_samples,
        "start": job.start,
        "padded": round(max(0.0, duration - covered), 6),
        "source_media": source_info,
    }
    members = {
        "mp4": encode_video(np.stack(frames), params.encoding()),
        params.audio_format: encode_audio(pcm, params.sample_rate, params.audio_format),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return ClipResult(job.key, sample=Sample(job.key, members))


def _audio_info(stream: av.AudioStream | None) -> dict[str, Any]:
    if stream is None:
        return {}
    cc = stream.codec_context
    return {"audio_codec": cc.codec.canonical_name, "audio_rate": cc.sample_rate, "audio_channels": cc.channels}


def describe(path: str | os.PathLike, params: ClipParams) -> str:
    """One line for ``python -m shards probe``: the streams of a file and whether the builder would take it."""
    name = Path(path).name
    try:
        info = probe(path)
    except ClipRejected as rej:
        return f"{name}: REJECT ({rej.code}) {rej.reason}"
    parts = [f"{info['format']}", f"{info['duration']:.2f} s" if info["duration"] is not None else "? s"]
    v, a = info["video"], info["audio"]
    parts.append(f"video {v['codec']} {v['width']}x{v['height']} {v['fps']} fps" if v else "no video")
    parts.append(f"audio {a['codec']} {a['sample_rate']} Hz {a['channels']} ch" if a else "no audio")
    job = ClipJob(
        key="probe",
        index=0,
        source=name,
        path=str(path),
        start=0.0,
        labels=(),
        label_names=(),
        category="",
        task="",
        split="",
    )
    result = process_clip(job, params)
    verdict = "OK" if result.sample is not None else f"REJECT ({result.code}) {result.reason}"
    return f"{name}: {', '.join(parts)}: {verdict}"


__all__ = [
    "CHANNEL_RULES",
    "SHORT_CLIP_RULES",
    "ClipJob",
    "ClipParams",
    "ClipRejected",
    "ClipResult",
    "check_file",
    "describe",
    "open_media",
    "probe",
    "process_clip",
    "video_stream",
]
