"""data.py: manifests, decoding, clip sampling, features, masks, transforms, data sets, CLI.

Media are real files written in the tests (tests/conftest.py); every video frame shows its own
index, so the tests check which frames were read.
"""

import argparse
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, Sample
from model import HiCMAEConfig, make_config
from tools.bench_loader import bench
from tools.demo_data import write_demo
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
def small(**overrides):
    """A small clip geometry for the data sets (the model's configuration carries it)."""
    return make_config("tiny", **dict(dict(img_size=64, num_frames=4, audio_frames=128, mel_bins=64), **overrides))


SMALL = dict(sampling_rate=2)


# ----------------------------------------------------------------------------------------------
# Features and audio

def test_fbank_matches_reference():
    expected = torch.load(FIXTURES / "fbank_reference.pt", weights_only=True)
    waveform = data.read_audio(str(FIXTURES / "speech_16k.wav"))
    assert waveform.shape == (1, expected["num_samples"])
    torch.testing.assert_close(data.fbank(waveform), expected["full_file"], atol=1e-4, rtol=0)
    torch.testing.assert_close(data.fbank(waveform[:, :16000]), expected["first_second"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, rate, codec", [
    ("tone.wav", 44100, "pcm_s16le"), ("tone.m4a", 48000, "aac"), ("tone.flac", 44100, "flac"),
    ("tone.webm", 48000, "libopus"), ("tone.mp4", 48000, "aac")])
def test_read_audio_mixes_to_mono_16k(media, name, rate, codec):
    path = media.audio(name, rate, media.tone(1.0, rate, amplitudes=(0.6, 0.2)), codec)
    waveform = data.read_audio(path)
    assert waveform.dtype == torch.float32 and waveform.shape[0] == 1
    assert abs(waveform.shape[1] - 16000) <= 400
    middle = waveform[0, 2000:14000].numpy()
    peak_hz = np.argmax(np.abs(np.fft.rfft(middle))) * 16000 / middle.size
    assert abs(peak_hz - 440) < 2
    rms = np.sqrt((middle ** 2).mean())
    assert abs(rms - 0.4 / np.sqrt(2)) < 0.02  # the mean of the channels (0.6 and 0.2)


# ----------------------------------------------------------------------------------------------
# Decoding video files and frame folders

@pytest.mark.parametrize("name, codec, fps", [
    ("a.mp4", "libx264", 30000 / 1001), ("b.webm", "libvpx-vp9", 12.5), ("c.avi", "mpeg4", 15),
    ("d.mkv", "libx264", 24), ("e.mov", "mjpeg", 50)])
def test_video_file_frames_in_display_order(media, name, codec, fps):
    video = data.open_video(media.video(name, 90, fps=Fraction(fps).limit_denominator(1001), codec=codec))
    assert isinstance(video, data.VideoFile) and len(video) == 90
    assert video.time(45) == pytest.approx(45 / fps, abs=1e-3)
    indices = [0, 7, 45, 46, 89, 89]
    frames = video.read(indices)
    assert frames.dtype == torch.uint8 and frames.shape == (6, 3, 48, 80)
    assert media.ids(frames) == indices
    assert media.ids(video.read([60, 64, 68])) == [60, 64, 68]  # seeks past the start


def test_video_read_retries_from_start_then_names_the_missing_frame(media, monkeypatch):
    video = data.open_video(media.video("a.mp4", 90, options={"x264-params": "keyint=10:min-keyint=10:scenecut=0"}))
    decode, calls = data.VideoFile._decode, []

    def seek_misses(self, wanted, begin):  # a keyframe that lands after the first wanted frame
        calls.append(begin)
        frames = decode(self, wanted, begin)
        return {pts: f for pts, f in frames.items() if pts != self.pts[40]} if begin else frames

    monkeypatch.setattr(data.VideoFile, "_decode", seek_misses)
    assert media.ids(video.read([40, 44, 48])) == [40, 44, 48]
    assert len(calls) == 2 and calls[0] > 0 and calls[1] == 0
    monkeypatch.setattr(data.VideoFile, "_decode", lambda self, wanted, begin: {})
    with pytest.raises(DataError, match=r"a.mp4: frame 40 of 90 cannot be decoded"):
        video.read([40, 44])


@pytest.mark.parametrize("ext, pattern", [("jpg", "{:05d}"), ("png", "img_{:04d}"), ("bmp", "frame_det_00_{:06d}")])
def test_frame_folder_in_name_order(media, ext, pattern):
    folder = media.frames("clip", 20, ext, pattern)
    media.file("clip/notes.txt", b"not a frame")
    video = data.open_video(folder)
    assert isinstance(video, data.FrameFolder) and len(video) == 20
    frames = video.read([0, 5, 19, 19])
    assert media.ids(frames) == [0, 5, 19, 19]
    if ext != "jpg":  # lossless: the pixels written
        written = np.stack([media.image(i) for i in (0, 5, 19, 19)])
        assert torch.equal(frames, torch.from_numpy(written).permute(0, 3, 1, 2))


def test_jpg_frames_are_within_a_grey_level_of_another_decoders_pixels():
    """256 x 256 jpg frames, as face crops are written (4:2:0 at quality 95, and 4:4:4 at 90), against the pixels
    torchvision 0.26's libjpeg-turbo decoder made of the same files (tests/fixtures/README.md)."""
    video = data.open_video(str(FIXTURES / "jpeg_frames"))
    frames = video.read(list(range(len(video)))).int()
    decoded = sorted((FIXTURES / "jpeg_frames_decoded").glob("*.png"))
    expected = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in decoded]))  # lossless
    assert frames.shape == (3, 3, 256, 256) and len(decoded) == 3
    assert (frames - expected.permute(0, 3, 1, 2).int()).abs().max() <= 1


# ----------------------------------------------------------------------------------------------
# Clip sampling and the audio window

def test_clip_indices():
    assert data.clip_indices(100, 10, 16, 4) == list(range(10, 74, 4))
    assert data.clip_indices(20, 0, 16, 4) == [0, 4, 9, 14, 19] + [19] * 11  # short: spread, then last
    assert data.clip_indices(3, 0, 16, 4) == [0] + [2] * 15
    starts = {data.random_start(100, 64, torch.Generator().manual_seed(s)) for s in range(200)}
    assert starts == set(range(37))


def test_test_clips_follow_the_authors_rule():
    # the stride-4 list below N, padded with its last entry to 16 (L entries); clip k of 2 starts at
    # position int(k * (L - 16)) of that list
    assert data.test_clips(75, 16, 4, 2) == [list(range(0, 64, 4)), list(range(12, 76, 4))]  # L = 19
    assert data.test_clips(40, 16, 4, 2) == [list(range(0, 40, 4)) + [36] * 6] * 2  # short: L = 16
    assert data.test_clips(3, 16, 4, 2) == [[0] * 16] * 2
    assert data.test_clips(100, 16, 4, 3) == [list(range(p, p + 64, 4)) for p in (0, 16, 36)]  # L = 25: 0, 4.5, 9
    assert data.test_clips(100, 16, 4, 1) == [list(range(16, 80, 4))]  # one clip: the centre, position 4


def test_training_clip_and_audio_window_from_timestamps(media):
    fps = 30000 / 1001
    video = media.video("silent.mp4", 150, fps=Fraction(30000, 1001))
    wav = media.audio("ramp.wav", 44100, media.ramp(5.5, 44100))  # value = time / 5.5 s
    sample = Sample(video, wav, 1, "m.csv:1")
    (frames, window), = data.load_clips(sample, generator=torch.Generator().manual_seed(3))
    ids = media.ids(frames)
    start = ids[0]
    assert 0 <= start <= 150 - 64 and ids == [start + 4 * j for j in range(16)]
    t0, t1 = start / fps, (start + 64) / fps
    assert window.shape[1] == round(t1 * 16000) - round(t0 * 16000)
    assert window[0, 0].item() == pytest.approx(t0 / 5.5, abs=2e-3)
    assert window[0, -1].item() == pytest.approx(t1 / 5.5, abs=2e-3)
    clips = data.load_clips(sample, num_clips=2)  # test: L = 38 entries, clip 2 from position 22
    assert [media.ids(f) for f, _ in clips] == [list(range(0, 64, 4)), list(range(88, 152, 4))]
    t0, t1 = 88 / fps, 149 / fps  # the last frame: min(148 + 4, 149)
    assert clips[1][1].shape[1] == round(t1 * 16000) - round(t0 * 16000)


def test_audio_window_of_frame_folder_is_relative(media):
    folder = media.frames("clip", 100)
    wav = media.audio("ramp.wav", 16000, media.ramp(4.0, 16000, channels=1))
    (frames, window), = data.load_clips(Sample(folder, wav, 0, "m.csv:1"), generator=torch.Generator().manual_seed(0))
    start = media.ids(frames)[0]
    a, b = int(start / 99 * 64000), int((start + 64) / 99 * 64000)  # frame i at i / (n - 1)
    assert window.shape[1] == b - a
    assert window[0, 0].item() == pytest.approx(a / 63999, abs=1e-3)


def test_short_clip_and_whole_file_fallback(media):
    audio = ("aac", 16000, media.tone(0.8, 16000, amplitudes=(0.5,)))
    short = media.video("short.mp4", 20, fps=25, audio=audio)
    (frames, window), = data.load_clips(Sample(short, None, None, "m.csv:1"), generator=torch.Generator())
    assert media.ids(frames) == [0, 4, 9, 14, 19] + [19] * 11
    assert abs(window.shape[1] - round(19 / 25 * 16000)) <= 1  # capped at the last frame
    one = media.frames("one", 1)
    wav = media.audio("short.wav", 16000, media.tone(2.0, 16000, amplitudes=(0.5,)))
    (_, window), = data.load_clips(Sample(one, wav, 0, "m.csv:2"))
    assert window.shape[1] == 32000  # empty window, file under 2.56 s: the whole file
    long_wav = media.audio("long.wav", 16000, media.tone(3.0, 16000, amplitudes=(0.5,)))
    with pytest.raises(DataError, match=r"^m.csv:3: .*long.wav: audio window of 0 samples"):
        data.load_clips(Sample(one, long_wav, 0, "m.csv:3"))


def test_test_views_equal_the_authors():
    """What the authors' CREMA-D test pipeline returned for two frame folders (75 frames, and a short
    clip of 40): the same frames, pixels within one grey level, audio features (gain 1) within 1e-4."""
    expected = torch.load(FIXTURES / "authors_test_views.pt", weights_only=True)
    settings, media_dir = expected["settings"], FIXTURES / "authors_test_views_media"
    mean, std = (torch.tensor(settings[k]).view(3, 1, 1, 1) for k in ("video_mean", "video_std"))
    grey_level = 1 / (255 * std)  # per channel, normalised
    for sample in expected["samples"]:
        views = sample["views"]
        row = Sample(str(media_dir / sample["name"]), str(media_dir / sample["wav_file"]), sample["label"], "t.csv:1")
        geometry = HiCMAEConfig(img_size=settings["input_size"], num_frames=settings["num_frames"],
                                audio_frames=settings["input_size_audio"], mel_bins=settings["num_mel_bins"])
        dataset = data.FinetuneDataset([row], geometry, train=False, sampling_rate=settings["sampling_rate"],
                                       num_clips=settings["test_num_segment"], num_crops=settings["test_num_crop"])
        clips = data.test_clips(len(sample["frame_files"]), settings["num_frames"], settings["sampling_rate"],
                                settings["test_num_segment"])
        assert [clips[v["segment"]] for v in views] == [v["frame_indices"] for v in views]
        item = dataset[0]
        assert len(item["video"]) == len(views)
        for ours, view in zip(range(len(views)), views):  # both clip-major: segment, then crop
            assert (view["segment"], view["crop"]) == divmod(ours, settings["test_num_crop"])
            theirs = (view["video_uint8"] / 255 - mean) / std  # their float32 tensor, bit for bit (fixtures/README.md)
            assert ((item["video"][ours] - theirs).abs() <= grey_level + 1e-6).all(), sample["name"]
            torch.testing.assert_close(item["audio"][ours], view["audio_unit_gain"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Bad input: an error naming the row, the path and the reason

def _truncate(path, keep=0.5):
    content = Path(path).read_bytes()
    Path(path).write_bytes(content[:int(len(content) * keep)])
    return path


def _bad_samples(media):
    """(sample, path named in the error, reason pattern) for each kind of bad row."""
    audio = ("aac", 16000, media.tone(4.0, 16000, amplitudes=(0.5,)))
    good = media.video("good.mp4", 100, audio=audio)
    silent = media.video("silent.mp4", 100)
    wav = media.audio("good.wav", 16000, media.tone(4.0, 16000, amplitudes=(0.5,)))
    cut = _truncate(media.video("cut.mp4", 100, audio=audio))
    cut_fast = _truncate(media.video("cut_fast.mp4", 100, audio=audio, faststart=True))
    cut_mp3 = _truncate(media.audio("cut.mp3", 16000, media.tone(4.0, 16000, amplitudes=(0.5,)), "libmp3lame"))
    text = media.file("text.mp4", b"this is not a video\n" * 200)
    (media.root / "empty").mkdir()
    corrupt = media.frames("corrupt", 3)
    media.file("corrupt/000003.jpg", b"\xff\xd8 broken jpeg")
    return [
        (Sample(str(media.root / "gone.mp4"), None, 0, "m:1"), str(media.root / "gone.mp4"), "no such file"),
        (Sample(cut, None, 0, "m:2"), cut, "an MP4/MOV file without its index"),  # not the text file's reason
        (Sample(cut_fast, None, 0, "m:3"), cut_fast, r"truncated: \d+ of 100 video frames"),
        (Sample(text, None, 0, "m:4"), text, r"not a media file FFmpeg can read \(4000 bytes\)"),
        (Sample(str(media.root / "empty"), wav, 0, "m:5"), str(media.root / "empty"), "no jpg/png/bmp frames"),
        (Sample(corrupt, wav, 0, "m:6"), corrupt + "/000003.jpg", "cannot read image"),
        (Sample(silent, None, 0, "m:7"), silent, "no audio stream .*--audio"),
        (Sample(silent, str(media.root / "gone.wav"), 0, "m:8"), str(media.root / "gone.wav"), "no such file"),
        (Sample(good, text, 0, "m:9"), text, "not a media file"),
        (Sample(good, cut_mp3, 0, "m:10"), cut_mp3, r"truncated: 1.\d\d s of audio decoded, 4.00 s declared"),
        (Sample(corrupt, None, 0, "m:11"), corrupt, "a frame folder has no audio .*--audio"),
    ]


def test_bad_rows_raise_with_row_path_and_reason(media):
    for sample, path, reason in _bad_samples(media):
        with pytest.raises(DataError) as error:
            data.load_clips(sample, generator=torch.Generator())
        assert re.match(rf"{sample.row}: {re.escape(path)}: .*{reason}", str(error.value)), str(error.value)


# ----------------------------------------------------------------------------------------------
# Manifests

def test_read_manifest_root_map_and_labels(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text("/share/home/old/faces/a /share/home/old/audio/a.wav 3\n"
                        "\n# a comment\n"
                        "rel/b /audio/b.wav 0\n")
    root_map = [data.root_map_arg(pair) for pair in ("/share/home/old=/data/new", "/audio=/mnt/audio")]
    a, b = data.read_manifest(manifest, root_map, "classification")
    assert (a.video, a.audio, a.target, a.row) == ("/data/new/faces/a", "/data/new/audio/a.wav", 3, f"{manifest}:1")
    assert (b.video, b.audio, b.target, b.row) == (str(tmp_path / "rel/b"), "/mnt/audio/b.wav", 0, f"{manifest}:4")

    manifest.write_text("/v/a.mp4 /a/a.wav 0.5 1 -2\n/v/b.mp4 /a/b.wav 1.0 0.0 0.5\n")
    assert [s.target for s in data.read_manifest(manifest, task="regression")] == [[0.5, 1.0, -2.0], [1.0, 0.0, 0.5]]
    assert data.guess_task(manifest) == "regression"

    manifest.write_text("/v/a.mp4 0\n/v/b.mp4 /a/b.wav\n/v/c.mp4\n")  # the authors write `<video> 0`
    expected = [(None, None), ("/a/b.wav", None), (None, None)]
    assert [(s.audio, s.target) for s in data.read_manifest(manifest)] == expected
    assert data.guess_task(manifest) == "pretrain"

    manifest.write_text("/v/a.mp4 /a/a.wav 1\n/v/b.mp4 /a/b.wav happy\n/v/c.mp4 /a/c.wav\n")
    assert data.guess_task(manifest) == "classification"
    with pytest.raises(DataError, match=rf"^{re.escape(str(manifest))}:2: label 'happy' is not a class index"):
        data.read_manifest(manifest, task="classification")
    errors = []
    assert len(data.read_manifest(manifest, task="classification", errors=errors)) == 1
    assert [str(e).split(": ")[0] for e in errors] == [f"{manifest}:2", f"{manifest}:3"]

    manifest.write_text("/v/a.mp4 /a/a.wav 1 2\n/v/b.mp4 /a/b.wav 1\n")
    with pytest.raises(DataError, match=r":2: 1 regression targets, earlier rows have 2"):
        data.read_manifest(manifest, task="regression")
    with pytest.raises(argparse.ArgumentTypeError, match="OLD=NEW"):
        data.root_map_arg("/no/equals/sign")


# ----------------------------------------------------------------------------------------------
# Masks and transforms

def test_masks():
    g = torch.Generator().manual_seed(0)
    mask = data.tube_mask(8, 100, 0.9, g)
    assert mask.shape == (800,) and mask.sum() == 720
    slices = mask.view(8, 100)
    assert (slices == slices[0]).all() and slices[0].sum() == 90  # one pattern in every slice
    audio = data.random_mask(128, 0.8, g)
    assert audio.shape == (128,) and audio.sum() == 102
    again = torch.Generator().manual_seed(0)
    assert torch.equal(data.tube_mask(8, 100, 0.9, again), mask)
    assert torch.equal(data.random_mask(128, 0.8, again), audio)
    assert not torch.equal(data.random_mask(128, 0.8, torch.Generator().manual_seed(1)), audio)


def test_multiscale_crop_sizes_and_positions(monkeypatch):
    crops = []
    monkeypatch.setattr(data.TF, "resized_crop",
                        lambda x, top, left, h, w, size, antialias: crops.append((top, left, h, w)) or x)
    frames = torch.zeros(2, 3, 100, 180, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        data.multiscale_crop(frames, 64, g)
    sides = [100, 87, 75, 66]
    seen_pairs = set()
    for top, left, h, w in crops:
        i, j = sides.index(h), sides.index(w)
        assert abs(i - j) <= 1
        seen_pairs.add((h, w))
        dx, dy = (180 - w) // 4, (100 - h) // 4
        assert any((x * dx, y * dy) == (left, top) for x, y in data.MULTISCALE_POSITIONS)
    assert len(seen_pairs) == 10  # 4 + 3 + 3 pairs at most one step apart


def test_short_side_test_views_crop_along_the_long_side():
    columns = torch.arange(160).expand(1, 3, 80, 160).to(torch.uint8)  # value = column
    views = data.test_views(columns, 40, 2, "short_side")  # resized to 40 x 80: crops at x = 0 and x = 40
    assert [v.shape for v in views] == [(1, 3, 40, 40)] * 2
    assert views[0][0, 0, 0, 0] < 4 and views[1][0, 0, 0, -1] > 155
    square = torch.randint(0, 255, (1, 3, 50, 50), dtype=torch.uint8)
    a, b = data.test_views(square, 40, 2, "short_side")
    assert torch.equal(a, b)


def test_authors_test_views_stretch_the_whole_frame():
    columns = torch.arange(160).expand(1, 3, 80, 160).to(torch.uint8)  # value = column
    a, b = data.test_views(columns, 40, 2)  # the whole 160 x 80 frame squeezed to 40 x 40
    assert a.shape == (1, 3, 40, 40) and torch.equal(a, b)
    assert a[0, 0, 0, 0] < 4 and a[0, 0, 0, -1] > 155
    assert a[0, 0, 0, 20] in (80, 81, 82)  # the middle column


def _on_device(video, box):
    """normalize_batch of one item's uint8 frames (T, 3, H, W) and erasing box, as frames again (the
    erasing noise drawn from a seeded global generator, as in training, where the seed is --seed)."""
    with data.seeded_global_rng(torch.Generator().manual_seed(0)):
        batch = data.normalize_batch(dict(video=video.permute(1, 0, 2, 3)[None], erase=box[None]))
        return batch["video"][0].permute(1, 0, 2, 3)


def test_finetune_transform_is_one_transform_per_clip():
    image = torch.randint(0, 256, (1, 3, 48, 80), dtype=torch.uint8)
    with data.seeded_global_rng(torch.Generator().manual_seed(0)):
        out = data.finetune_train_transform(32)(image.repeat(4, 1, 1, 1))
        box = data.erasing_box(out, 1.0)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    assert (out == out[0]).all()  # the same crop, flip and RandAugment ops in every frame
    video = _on_device(out, box)
    assert video.dtype == torch.float32 and (video == video[0]).all()  # and the same erased box
    grey = torch.full((2, 3, 40, 40), 128, dtype=torch.uint8)
    for erase_prob, erased in ((0.0, False), (1.0, True)):
        with data.seeded_global_rng(torch.Generator().manual_seed(0)):
            out = data.finetune_train_transform(32, rand_ops=0)(grey)
            box = data.erasing_box(out, erase_prob)
        assert bool((_on_device(out, box) != data.normalize(out)).any()) == erased  # erasing writes random values


def test_normalising_and_erasing_on_the_device_equal_the_transform_on_the_host():
    """The uint8 item and its erasing box, normalised and erased in the training step, equal torchvision's
    normalisation and RandomErasing(value="random") on the host outside the box, with the same box, and
    leave the global generator where the host transform left it (so the audio draws are unchanged)."""
    frames = torch.randint(0, 256, (4, 3, 48, 80), dtype=torch.uint8)
    host = v2.Compose([data.finetune_train_transform(32, rand_ops=2), v2.Lambda(data.normalize),
                       v2.RandomErasing(p=0.7, value="random")])
    erased = 0
    for seed in range(8):
        with data.seeded_global_rng(torch.Generator().manual_seed(seed)):
            expected, after = host(frames), torch.rand(1)
        with data.seeded_global_rng(torch.Generator().manual_seed(seed)):
            video = data.finetune_train_transform(32, rand_ops=2)(frames)
            box, after_ours = data.erasing_box(video, 0.7), torch.rand(1)
        assert torch.equal(after, after_ours)
        top, left, height, width = box.tolist()
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:top + height, left:left + width] = True
        got = _on_device(video, box)
        assert torch.equal(got[..., ~inside], expected[..., ~inside])
        if height:
            erased += 1
            assert not torch.equal(got[..., inside], expected[..., inside])  # noise, from another generator
            # the host erased it too
            assert not torch.isclose(expected[..., inside], data.normalize(video)[..., inside]).all()
        else:
            assert torch.equal(expected, data.normalize(video))  # the host erased nothing either
    assert 0 < erased < 8


def test_audio_augmentation():
    x = torch.arange(1000.0)[None]
    shifts = set()
    for seed in range(5):
        with data.seeded_global_rng(torch.Generator().manual_seed(seed)):
            y = data.roll_and_gain(x)
        shift = int(torch.argmin(y))  # where sample 0 went
        gain = float(y[0, (shift + 1) % 1000])
        assert 0.5 < gain < 1.5
        torch.testing.assert_close(y, torch.roll(x, shift, dims=1) * gain)
        shifts.add(shift)
    assert len(shifts) == 5
    feats = torch.randn(256, 128)
    assert torch.equal(data.spec_mask(feats, 0, 0), feats)
    with data.seeded_global_rng(torch.Generator().manual_seed(0)):
        masked = data.spec_mask(feats, 24, 48)
    value = -data.FBANK_MEAN / (2 * data.FBANK_STD)  # a raw log-Mel 0
    assert (masked == value).all(0).any() and (masked == value).all(1).any()  # a frequency band, a time span


# ----------------------------------------------------------------------------------------------
# Data sets

@pytest.fixture
def clips(media):
    """Four short videos with AAC audio, as pre-training samples."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        noise = (0.1 * rng.standard_normal((1, 32000))).astype(np.float32)
        path = media.video(f"v{i}.mp4", 50, fps=25, audio=("aac", 16000, noise))
        samples.append(Sample(path, None, i % 2, f"m.csv:{i + 1}"))
    return samples


def _items(dataset, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                         generator=torch.Generator(), timeout=120 if workers else 0)
    return [batch for batch in loader]


def test_items_depend_on_seed_epoch_index_not_on_workers(clips):
    dataset = data.PretrainDataset(clips, small(video_mask_ratio=0.5), **SMALL)
    item = dataset[0]
    assert item["video"].shape == (3, 4, 64, 64) and item["audio"].shape == (1, 128, 64)
    assert item["video_mask"].shape == (2 * 16,) and item["audio_mask"].shape == (8 * 4,)
    assert item["bad"] == 0 and item["index"] == 0
    state = torch.get_rng_state()
    serial, parallel = _items(dataset, 0), _items(dataset, 2)
    assert torch.equal(state, torch.get_rng_state())  # the items drew nothing from the global generator
    for a, b in zip(serial, parallel):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    masks = torch.cat([batch["video_mask"] for batch in parallel])
    assert len({tuple(m.tolist()) for m in masks}) == 4  # every item its own mask, in both workers
    other_seed = _items(data.PretrainDataset(clips, small(video_mask_ratio=0.5), seed=1, **SMALL), 2)
    assert not torch.equal(torch.cat([b["video_mask"] for b in other_seed]), masks)
    dataset.set_epoch(1)
    assert not torch.equal(torch.cat([b["video_mask"] for b in _items(dataset, 0)]), masks)


def test_bad_sample_replaced_during_training(clips, tmp_path):
    missing = Sample(str(tmp_path / "gone.mp4"), None, 0, "m.csv:9")
    dataset = data.PretrainDataset([clips[0], missing, clips[1]], small(), **SMALL)
    with pytest.warns(UserWarning, match=r"m.csv:9: .*gone.mp4: no such file"):
        item = dataset[1]
    assert item["bad"] >= 1 and item["index"] == 1
    with pytest.raises(DataError, match="m.csv:9"):
        data.PretrainDataset([clips[0], missing], small(), strict=True, **SMALL)[1]
    with pytest.warns(UserWarning), pytest.raises(DataError, match="4 bad samples in a row"):
        data.PretrainDataset([missing, missing], small(), max_retries=3, **SMALL)[0]


def test_finetune_items(clips, media):
    train = data.FinetuneDataset(clips, small(), train=True, **SMALL)
    item = train[2]
    assert item["video"].shape == (3, 4, 64, 64) and item["audio"].shape == (1, 128, 64)
    assert item["target"].dtype == torch.long and item["target"] == 0 and item["bad"] == 0
    state = torch.get_rng_state()
    again = data.FinetuneDataset(clips, small(), train=True, **SMALL)[2]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(item["video"], again["video"]) and torch.equal(item["audio"], again["audio"])
    assert not torch.equal(item["video"], data.FinetuneDataset(clips, small(), train=True, seed=5, **SMALL)[2]["video"])
    plain = data.FinetuneDataset(clips, small(), train=True, roll_gain=False, **SMALL)[2]
    assert torch.equal(plain["video"], item["video"]) and not torch.equal(plain["audio"], item["audio"])

    noise = (0.1 * np.random.default_rng(1).standard_normal((1, 64000))).astype(np.float32)
    long = media.video("long.mp4", 100, fps=25, audio=("aac", 16000, noise))
    regression = [Sample(long, None, [0.5, 1.0, 0.0], "r.csv:1")]
    test = data.FinetuneDataset(regression, small(), train=False, num_clips=2, num_crops=2, **SMALL)[0]
    assert test["video"].shape == (4, 3, 4, 64, 64) and test["audio"].shape == (4, 1, 128, 64)
    assert test["target"].dtype == torch.float32 and test["target"].tolist() == [0.5, 1.0, 0.0]
    assert torch.equal(test["audio"][0], test["audio"][1]) and torch.equal(test["audio"][2], test["audio"][3])
    assert not torch.equal(test["audio"][0], test["audio"][2])  # two clips, two windows
    assert torch.equal(test["video"][0], test["video"][1])  # the authors' views: the whole frame, twice
    kept = data.FinetuneDataset(regression, small(), train=False, num_clips=2, num_crops=2, test_views="short_side",
                                **SMALL)[0]
    assert not torch.equal(kept["video"][0], kept["video"][1])  # 80 x 48 frames: two crops differ
    with pytest.raises(DataError, match="r.csv:2"):
        data.FinetuneDataset([Sample(long + ".gone", None, [0.0], "r.csv:2")], small(), train=False, **SMALL)[0]
    with pytest.raises(ValueError, match="needs a label"):
        data.FinetuneDataset([Sample(long, None, None, "p.csv:1")], small(), train=True)


# ----------------------------------------------------------------------------------------------
# Command line

def test_check_reports_exactly_the_broken_rows(media, capsys):
    audio = ("aac", 16000, media.tone(4.0, 16000, amplitudes=(0.5,)))
    media.video("good.mp4", 100, audio=audio)
    media.frames("faces", 100)
    media.audio("faces.wav", 16000, media.tone(4.0, 16000, amplitudes=(0.5,)))
    _truncate(media.video("cut.mp4", 100, audio=audio))
    media.file("text.mp4", b"not a video\n" * 100)
    (media.root / "empty").mkdir()
    media.video("silent.mp4", 100)
    rows = ["good.mp4 good.mp4 1", "faces faces.wav 2", "gone.mp4 gone.mp4 0", "cut.mp4 cut.mp4 0",
            "text.mp4 text.mp4 0", "empty faces.wav 0", "good.mp4 good.mp4 happy", "silent.mp4 silent.mp4 0"]
    manifest = media.file("mixed.csv", "\n".join(rows).encode())
    assert data.main(["check", manifest, "--workers", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 ok, 6 failed"
    assert sorted(int(line.split(":")[1]) for line in lines[:-1]) == [3, 4, 5, 6, 7, 8]
    good = media.file("good.csv", "\n".join(rows[:2]).encode())
    assert data.main(["check", good]) == 0
    assert capsys.readouterr().out.strip() == "2 ok, 0 failed"


def test_check_with_root_map(media, capsys):
    media.video("good.mp4", 80, audio=("aac", 16000, media.tone(3.5, 16000, amplitudes=(0.5,))))
    manifest = media.file("moved.csv", b"/old/machine/good.mp4\n")
    assert data.main(["check", manifest]) == 1
    capsys.readouterr()
    assert data.main(["check", manifest, "--root_map", f"/old/machine={media.root}"]) == 0
    assert capsys.readouterr().out.strip() == "1 ok, 0 failed"


def test_scan_writes_a_pretraining_manifest(tmp_path, capsys):
    videos, audios = tmp_path / "mp4", tmp_path / "aac"
    for rel in ("id00002/xyz/00001.mp4", "id00001/abc/00002.mp4", "id00001/abc/00001.mp4"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"")
    (audios / "id00001/abc").mkdir(parents=True)
    (audios / "id00001/abc/00001.m4a").write_bytes(b"")
    (tmp_path / "mp4" / "notes.txt").write_bytes(b"")
    out = tmp_path / "pretrain.csv"
    assert data.main(["scan", str(videos), "--out", str(out), "--audio_root", str(audios)]) == 0
    assert out.read_text().splitlines() == [
        f"{videos}/id00001/abc/00001.mp4 {audios}/id00001/abc/00001.m4a",
        f"{videos}/id00001/abc/00002.mp4 {videos}/id00001/abc/00002.mp4",
        f"{videos}/id00002/xyz/00001.mp4 {videos}/id00002/xyz/00001.mp4"]
    assert "3 clips (1 with a separate audio file)" in capsys.readouterr().out


def test_demo_then_check_and_bench(tmp_path, capsys):
    train, test = write_demo(tmp_path / "demo", seed=0, num_train=4, num_test=4)
    assert data.check(train, num_frames=8) == 0 and data.check(test, num_frames=8) == 0  # the demo model's span
    assert capsys.readouterr().out.strip().splitlines() == ["4 ok, 0 failed"] * 2
    again, _ = write_demo(tmp_path / "again", seed=0, num_train=4, num_test=4)
    first = lambda manifest: Path(Path(manifest).read_text().split()[0]).read_bytes()
    assert first(train) == first(again)  # deterministic for a seed
    capsys.readouterr()
    assert bench(train, batch_size=2, num_batches=1, task="pretrain") > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"pretrain: 2 clips in .* clips/s with 0 workers \(batch 2\); [\d.]+ ms CPU per item = "
                        r"[\d.]+ clips/s per core", last), last


# ----------------------------------------------------------------------------------------------
# One modality, short clips, usage errors

def test_a_one_modality_sample_reads_only_its_stream(media):
    silent = media.video("silent.mp4", 30)
    faces = media.frames("faces", 30)
    ramp = media.audio("ramp.wav", 16000, media.ramp(4.0, 16000, channels=1))  # a sample's value is its time / 4 s
    for sample in (Sample(silent, None, 0, "m:1"), Sample(faces, None, 0, "m:2")):
        (frames, _), = data.load_clips(sample, num_frames=4, sampling_rate=2, audio_frames=32, modality="video")
        assert media.ids(frames) == [10, 12, 14, 16]  # test_clips(30, 4, 2, 1): entries 0, 2, ..., 28 from position 5
    for sample in (Sample(None, ramp, 0, "m:3"), Sample(ramp, None, 0, "m:4")):
        (frames, window), = data.load_clips(sample, num_frames=4, sampling_rate=2, audio_frames=32, modality="audio")
        # 4 s at 25 frames per second: 100 frames; the clip is frames 46, 48, 50, 52 and its audio runs
        # from frame 46 to 54, 1.84 s to 2.16 s
        assert frames is None and window.shape == (1, 8 * 640)  # an audio model decodes no frames
        assert window[0, 0].item() == pytest.approx(1.84 / 4, abs=1e-4)
    with pytest.raises(DataError, match="no audio stream"):  # both streams for an audio-visual model, as before
        data.load_clips(Sample(silent, None, 0, "m:5"), num_frames=4, sampling_rate=2, audio_frames=32)


def test_check_warns_of_each_clip_shorter_than_the_span(media, capsys):
    audio = ("aac", 16000, media.tone(2.0, 16000, amplitudes=(0.5,)))
    media.video("short.mp4", 20, audio=audio)
    media.video("long.mp4", 40, audio=audio)
    manifest = media.file("m.csv", b"short.mp4 short.mp4 0\nlong.mp4 long.mp4 1\n")
    assert data.main(["check", manifest, "--num_frames", "8"]) == 0  # a span of 32 frames; a warning is no failure
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 ok, 0 failed" and len(lines) == 2
    assert lines[0].startswith(f"warning: {manifest}:1: {media.root / 'short.mp4'}: 20 frames, shorter than")
    assert data.main(["check", manifest, "--num_frames", "4"]) == 0  # a span of 16 frames: no warning
    assert capsys.readouterr().out.strip() == "2 ok, 0 failed"


def test_a_malformed_root_map_is_a_usage_error(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.mp4 a.mp4 0\n")
    with pytest.raises(SystemExit) as exit_:
        data.main(["check", str(manifest), "--root_map", "/no/equals/sign"])
    assert exit_.value.code == 2
    assert "--root_map: a root map is OLD=NEW, got '/no/equals/sign'" in capsys.readouterr().err
