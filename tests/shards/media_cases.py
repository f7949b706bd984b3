"""The source media of the shard-builder tests: what to write, and what the builder must say about each file.

Good files cover the shapes real inputs come in (H.264 + AAC 48 kHz stereo, VP9 + Opus, portrait,
display-rotated, variable frame rate, HEVC + FLAC 5.1 at 32 kHz, MPEG-4 + MP3 mono at 8 kHz, audio shorter
than video); bad files are the ones a build must reject, with the code and the words of the reason it must give.
"""

from __future__ import annotations

from pathlib import Path

from shards.sample_media import MediaSpec, write_broken, write_media

GOOD: dict[str, MediaSpec] = {
    "h264_aac.mp4": MediaSpec(video="h264", audio="aac", sample_rate=48000, layout="stereo"),
    "vp9_opus.webm": MediaSpec(video="vp9", audio="opus", sample_rate=48000, layout="stereo", seed=1),
    "portrait.mp4": MediaSpec(width=64, height=96, seed=2),
    "rotated.mp4": MediaSpec(rotation=90, seed=3),
    "vfr.mp4": MediaSpec(vfr=True, seed=4),
    "hevc_51.mkv": MediaSpec(video="hevc", audio="flac", layout="5.1", sample_rate=32000, fps=23.976, seed=5),
    "mpeg4_mono.mkv": MediaSpec(video="mpeg4", audio="mp3", layout="mono", sample_rate=8000, fps=30, seed=6),
    "short_audio.mp4": MediaSpec(audio_duration=1.4, seed=7),
}

BAD: dict[str, tuple[str, str]] = {
    "no_audio.mp4": ("no_audio", "no audio stream"),
    "audio_only.m4a": ("no_video", "no video stream"),
    "too_short.mp4": ("too_short", "too short"),
    "truncated.mp4": ("corrupt", "corrupt or truncated"),
    "text.mp4": ("not_media", "not a media file"),
    "empty.mp4": ("empty", "empty file"),
}
"""name -> (reject code, words the reason must contain)."""

CLIP_ARGS = ["--size", "64", "--fps", "8", "--duration", "2", "--seed", "0"]
"""Encoding arguments every test build uses: 64 px, 8 fps, 2 s clips (16 frames, 32000 samples)."""


def write_all(root: Path) -> dict[str, Path]:
    files = {name: write_media(root / name, spec) for name, spec in GOOD.items()}
    files["no_audio.mp4"] = write_media(root / "no_audio.mp4", MediaSpec(audio=None))
    files["audio_only.m4a"] = write_media(root / "audio_only.m4a", MediaSpec(video=None))
    files["too_short.mp4"] = write_media(root / "too_short.mp4", MediaSpec(duration=0.6))
    files["truncated.mp4"] = write_broken(root / "truncated.mp4", "truncated", files["h264_aac.mp4"])
    files["text.mp4"] = write_broken(root / "text.mp4", "text")
    files["empty.mp4"] = write_broken(root / "empty.mp4", "empty")
    return files
