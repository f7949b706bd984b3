"""One clip through the builder's transcoder: timing (CFR, VFR, a start offset), geometry, audio rules, rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media_cases import BAD, GOOD

from shards.media import decode_audio, decode_video
from shards.sample_media import frame_times, grey_level, tone_amplitude
from shards.transcode import ClipJob, ClipParams, ClipResult, probe, process_clip

PARAMS = ClipParams(size=64, fps=8, duration=2.0)


def _run(path: Path, params: ClipParams = PARAMS, start: float = 0.0) -> ClipResult:
    job = ClipJob(
        key="clip",
        index=7,
        source=path.name,
        path=str(path),
        start=start,
        labels=(1,),
        label_names=("beta",),
        category="things",
        task="t0",
        split="train",
    )
    return process_clip(job, params)


def _expected_grey(name: str, start: float, params: ClipParams, n: int) -> np.ndarray:
    """Grey of the source frame on screen at the middle of each output frame (the builder's selection rule)."""
    spec = GOOD[name]
    times = np.asarray(frame_times(spec))
    targets = start + (np.arange(n) + 0.5) / params.fps
    shown = times[np.searchsorted(times, targets, side="right") - 1]
    return np.asarray(grey_level(shown, spec.duration))


def _window_rms(audio: np.ndarray, rate: int, t0: float, t1: float) -> float:
    seg = audio[int(t0 * rate) : int(t1 * rate)]
    return float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_sources_come_out_on_time_square_and_mono(media: dict[str, Path], name: str) -> None:
    result = _run(media[name])
    assert result.sample is not None, result.reason
    frames = decode_video(result.sample.members["mp4"])
    audio, rate = decode_audio(result.sample.members["flac"])
    assert frames.shape == (16, 64, 64, 3)
    assert rate == 16000 and audio.shape == (32000,)
    # the time code: left half of the source (bottom half once a 90-degree rotation is applied)
    row, col = (48, 32) if name == "rotated.mp4" else (32, 16)
    grey = frames[:, row, col].astype(float).mean(axis=1)
    np.testing.assert_allclose(grey, _expected_grey(name, 0.0, PARAMS, 16), atol=7)
    spec = GOOD[name]
    for t0, t1 in ((0.3, 0.7), (0.9, 1.3)):
        expected = float(tone_amplitude((t0 + t1) / 2, spec.audio_seconds)) / np.sqrt(2)
        assert _window_rms(audio, rate, t0, t1) == pytest.approx(expected, rel=0.15), (t0, t1)


def test_probe_reports_streams(media: dict[str, Path]) -> None:
    info = probe(media["h264_aac.mp4"])
    assert info["video"]["codec"] == "h264" and (info["video"]["width"], info["video"]["height"]) == (96, 64)
    assert info["audio"]["sample_rate"] == 48000 and info["audio"]["channels"] == 2
    assert probe(media["audio_only.m4a"])["video"] is None


def test_metadata_fields(media: dict[str, Path]) -> None:
    import json

    meta = json.loads(_run(media["vp9_opus.webm"]).sample.members["json"])
    assert meta["key"] == "clip" and meta["index"] == 7 and meta["labels"] == [1] and meta["label_names"] == ["beta"]
    assert (meta["category"], meta["task"], meta["split"], meta["source"]) == ("things", "t0", "train", "vp9_opus.webm")
    assert (meta["duration"], meta["fps"], meta["num_frames"]) == (2.0, 8, 16)
    assert (meta["sample_rate"], meta["num_samples"], meta["start"], meta["padded"]) == (16000, 32000, 0.0, 0.0)
    assert meta["source_media"]["video_codec"] == "vp9" and meta["source_media"]["audio_codec"] == "opus"


def test_start_offset_cuts_the_segment(media: dict[str, Path]) -> None:
    params = ClipParams(size=64, fps=8, duration=1.0)
    result = _run(media["h264_aac.mp4"], params, start=0.75)
    frames = decode_video(result.sample.members["mp4"])
    audio, rate = decode_audio(result.sample.members["flac"])
    assert frames.shape[0] == 8 and audio.shape == (16000,)
    np.testing.assert_allclose(frames[:, 32, 16].mean(axis=1), _expected_grey("h264_aac.mp4", 0.75, params, 8), atol=7)
    first = _window_rms(audio, rate, 0.0, 0.2)
    assert first == pytest.approx(float(tone_amplitude(0.85, 2.0)) / np.sqrt(2), rel=0.15)


def _tone_power(audio: np.ndarray, rate: int, freq: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(spectrum[np.abs(freqs - freq) < 10].sum())


def test_channel_rule_first_or_mean(media: dict[str, Path]) -> None:
    """Channel 0 is a 300 Hz tone, channel 1 a 600 Hz tone."""
    first = decode_audio(_run(media["h264_aac.mp4"]).sample.members["flac"])[0]
    mean = decode_audio(
        _run(media["h264_aac.mp4"], ClipParams(size=64, fps=8, duration=2.0, channel_rule="mean")).sample.members[
            "flac"
        ]
    )[0]
    assert _tone_power(first, 16000, 600) < 0.01 * _tone_power(first, 16000, 300)
    assert _tone_power(mean, 16000, 600) == pytest.approx(_tone_power(mean, 16000, 300), rel=0.2)
    assert _tone_power(mean, 16000, 300) == pytest.approx(0.25 * _tone_power(first, 16000, 300), rel=0.2)


def test_short_audio_is_padded_kept_or_rejected(media: dict[str, Path]) -> None:
    import json

    path = media["short_audio.mp4"]  # 2 s of video, 1.4 s of audio
    padded = _run(path)
    meta = json.loads(padded.sample.members["json"])
    audio, rate = decode_audio(padded.sample.members["flac"])
    assert meta["duration"] == 2.0 and meta["num_samples"] == 32000 and meta["padded"] == pytest.approx(0.6, abs=0.05)
    assert _window_rms(audio, rate, 1.5, 2.0) == 0.0 and _window_rms(audio, rate, 1.0, 1.3) > 0.1

    kept = _run(path, ClipParams(size=64, fps=8, duration=2.0, short_clips="keep"))
    meta = json.loads(kept.sample.members["json"])
    assert meta["duration"] == pytest.approx(1.4, abs=0.05) and meta["padded"] == 0.0
    assert meta["num_frames"] == 11 == decode_video(kept.sample.members["mp4"]).shape[0]
    assert meta["num_samples"] == decode_audio(kept.sample.members["flac"])[0].shape[0] == pytest.approx(22400, abs=800)

    strict = _run(path, ClipParams(size=64, fps=8, duration=2.0, min_duration=1.8))
    assert strict.sample is None and strict.code == "too_short"
    assert "audio too short" in strict.reason and "--min-duration" in strict.reason


@pytest.mark.parametrize("name", sorted(BAD) + ["missing.mp4"])
def test_bad_sources_are_rejected_with_a_reason(media: dict[str, Path], tmp_path: Path, name: str) -> None:
    path = media.get(name, tmp_path / name)
    result = _run(path)
    code, words = BAD.get(name, ("missing", "file not found"))
    assert result.sample is None
    assert result.code == code and words in result.reason, result.reason


def test_bad_parameters_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--size 15"):
        ClipParams(size=15)
    with pytest.raises(ValueError, match="--channel-rule 'left'"):
        ClipParams(channel_rule="left")
    with pytest.raises(ValueError, match="--min-duration 3"):
        ClipParams(duration=2.0, min_duration=3.0)
    with pytest.raises(ValueError, match="--audio-format 'mp3'"):
        ClipParams(audio_format="mp3")


def test_wav_audio_holds_the_same_samples_as_flac(media: dict[str, Path]) -> None:
    flac = _run(media["h264_aac.mp4"]).sample.members
    wav = _run(media["h264_aac.mp4"], ClipParams(size=64, fps=8, duration=2.0, audio_format="wav")).sample.members
    assert list(wav) == ["mp4", "wav", "json"] and wav["wav"][:4] == b"RIFF"
    a, rate_a = decode_audio(flac["flac"])
    b, rate_b = decode_audio(wav["wav"])
    assert rate_a == rate_b == 16000 and np.array_equal(a, b)  # both lossless 16-bit


def test_audio_from_a_separate_file(media: dict[str, Path]) -> None:
    """A datafile entry's own audio file (``--audio-from wav``) joins a video without sound."""
    import json

    job = ClipJob(
        key="pair",
        index=0,
        source="no_audio.mp4",
        path=str(media["no_audio.mp4"]),
        start=0.0,
        labels=(0,),
        label_names=("a",),
        category="c",
        task="t",
        split="test",
        audio_path=str(media["audio_only.m4a"]),
    )
    result = process_clip(job, PARAMS)
    assert result.sample is not None, result.reason
    meta = json.loads(result.sample.members["json"])
    assert meta["source_media"]["video_codec"] == "h264" and meta["source_media"]["audio_codec"] == "aac"
    assert decode_audio(result.sample.members["flac"])[0].shape == (32000,)
    missing = process_clip(ClipJob(**{**job.__dict__, "audio_path": str(media["text.mp4"])}), PARAMS)
    assert missing.code == "not_media"
