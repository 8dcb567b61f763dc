"""The loader's cheaper items and the prepared copy (tools/prepare.py), on real encoded files shaped
like VoxCeleb2 (tools/voxceleb_like.py: 224 x 224 H.264 at x264's defaults, a 16 kHz wav beside)."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import pretrain
from data import DataError, Sample
from model import HiCMAEConfig
from tools import prepare
from tools.voxceleb_like import write_set


@pytest.fixture(scope="module")
def voxceleb(tmp_path_factory):
    """Two 3.2 s clips (80 frames: a 64-frame span has 16 starts) and a manifest with a third row,
    a truncated copy of the first video."""
    root = tmp_path_factory.mktemp("vox")
    manifest = write_set(root, num=2, seconds=3.2)
    video = (root / "00000.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(video[:len(video) // 2])
    with open(manifest, "a") as f:
        f.write(f"{root / 'cut.mp4'} {root / '00000.wav'} 3\n")
    return manifest


@pytest.fixture(scope="module")
def prepared(voxceleb, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    path, failed = prepare.prepare(str(voxceleb), out, workers=2)
    return Path(path), failed


def _psnr(a, b):
    return float(10 * torch.log10(255 ** 2 / ((a.float() - b.float()) ** 2).mean()))


def test_prepared_items_equal_the_originals_up_to_compression(voxceleb, prepared, capsys):
    manifest, failed = prepared
    assert failed == 1 and manifest.name == "train.csv" and manifest.parent != voxceleb.parent
    originals = data.read_manifest(voxceleb, task="classification")[:2]
    copies = data.read_manifest(manifest, task="classification")
    assert len(copies) == 2 and [s.target for s in copies] == [s.target for s in originals]
    assert all(Path(s.video).parent == manifest.parent and s.audio.endswith(".wav") for s in copies)
    size = lambda samples: sum(Path(p).stat().st_size for s in samples for p in (s.video, s.audio))
    assert size(copies) <= 1.5 * size(originals)
    paper = HiCMAEConfig()
    for make in (lambda s: data.PretrainDataset(s, paper, strict=True),
                 lambda s: data.FinetuneDataset(s, paper, train=True, rand_ops=0, erase_prob=0.5, strict=True)):
        ours, theirs = make(originals), make(copies)
        for epoch in range(3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            for i in range(2):
                a, b = ours[i], theirs[i]
                assert a.keys() == b.keys() and a["video"].shape == b["video"].shape == (3, 16, 160, 160)
                for key in a.keys() - {"video", "audio"}:  # masks, erasing box, target, index
                    assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
                assert _psnr(a["video"], b["video"]) >= 30
                assert (a["audio"] - b["audio"]).abs().max() <= 0.1


def test_prepare_lists_an_undecodable_file_like_check_and_leaves_it_out(voxceleb, prepared, capsys):
    manifest, _ = prepared
    assert data.check(str(voxceleb)) == 1
    check_line = capsys.readouterr().out.splitlines()[0]
    assert re.search(r"train.csv:3: .*cut.mp4: an MP4/MOV file without its index", check_line)
    out = manifest.parent / "again"
    assert prepare.prepare(str(voxceleb), out)[1] == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == check_line and printed[-2:] == ["2 ok, 1 failed (left out)", str(out / "train.csv")]
    kept = [Path(s.video).name for s in data.read_manifest(out / "train.csv", task="classification")]
    assert len(kept) == 2 and not any(name.startswith("cut-") for name in kept)  # no copy of cut.mp4


def test_prepare_resumes_and_leaves_no_partial_file(voxceleb, prepared, capsys):
    manifest, _ = prepared
    out = manifest.parent
    files = sorted(p for p in out.iterdir() if p.suffix in (".mp4", ".wav"))
    assert len(files) == 4 and not [p for p in out.iterdir() if ".partial" in p.name]
    before = {p: p.stat().st_mtime_ns for p in files}
    rows = manifest.read_text()
    files[0].unlink()  # a run killed before writing this one, while writing this partial file
    (out / f"{files[0].name}.123.partial{files[0].suffix}").write_bytes(b"half")
    assert prepare.main([str(voxceleb), "--out", str(out)]) == 1  # 1: the cut row failed
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(manifest)
    assert manifest.read_text() == rows and files[0].exists()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != files[0])  # kept, not redone
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_a_wav_window_is_read_directly_and_equals_decoding(media):
    samples = (0.5 * np.random.default_rng(0).standard_normal((1, 20000))).clip(-1, 1).astype(np.float32)
    path = media.audio("a.wav", 16000, samples)
    audio = data.open_audio(path)
    assert isinstance(audio, data.WavFile) and audio.num_samples == 20000
    assert torch.equal(audio.window(1234, 9876), data.read_audio(path)[:, 1234:9876])
    stereo = media.audio("b.wav", 44100, np.stack([samples[0], samples[0]]))
    assert isinstance(data.open_audio(stereo), data.Waveform)  # other rates and layouts are decoded
    cut = media.file("cut.wav", Path(path).read_bytes()[:20000])
    with pytest.raises(DataError, match=r"cut.wav: truncated"):
        data.open_audio(cut)


def test_an_item_opens_its_file_once_and_skips_the_modality_it_does_not_need(media, monkeypatch):
    noise = (0.1 * np.random.default_rng(0).standard_normal((1, 32000))).astype(np.float32)
    clip = [Sample(media.video("v.mp4", 50, audio=("aac", 16000, noise)), None, 1, "m.csv:1")]
    small = dict(sampling_rate=2)
    geometry = HiCMAEConfig(img_size=64, num_frames=4, audio_frames=128, mel_bins=64)
    opened, open_file = [], data.av.open
    monkeypatch.setattr(data.av, "open", lambda *a, **k: opened.append(a[0]) or open_file(*a, **k))
    both = data.FinetuneDataset(clip, geometry, train=True, **small)[0]
    assert len(opened) == 1 and both["video"].dtype == torch.uint8 and both["erase"].shape == (4,)
    monkeypatch.setattr(data.VideoFile, "read", lambda *a: pytest.fail("decoded the video"))
    audio = data.FinetuneDataset(clip, geometry, train=True, modality="audio", **small)[0]
    assert "video" not in audio and audio["audio"].shape == both["audio"].shape
    monkeypatch.undo()
    monkeypatch.setattr(data, "_decode_audio", lambda *a: pytest.fail("decoded the audio"))
    video = data.FinetuneDataset(clip, geometry, train=True, modality="video", **small)[0]
    assert "audio" not in video and video["video"].shape == both["video"].shape


def test_persistent_workers_see_each_epoch(media):
    tone = 0.1 * np.ones((1, 19200), np.float32)
    clips = [Sample(media.video(f"v{i}.mp4", 30), media.audio(f"a{i}.wav", 16000, tone),
                    None, f"m.csv:{i}") for i in range(2)]
    geometry = HiCMAEConfig(img_size=32, num_frames=4, audio_frames=64, mel_bins=32)
    dataset = data.PretrainDataset(clips, geometry, sampling_rate=2)
    args = SimpleNamespace(batch_size=2, num_workers=1, seed=0)
    env = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"))
    loader = pretrain.make_loader(dataset, args, env, train=False)
    assert loader.persistent_workers
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batch = next(iter(loader))
        expected = torch.stack([dataset[i]["video_mask"] for i in batch["index"].tolist()])
        assert torch.equal(batch["video_mask"], expected)
    on_device = pretrain.to_device(batch, env.device)
    assert torch.equal(on_device["video"], data.normalize(batch["video"].transpose(1, 2)).transpose(1, 2))
