"""evaluate.py --video on recordings of any length: a window is classified as the same clip through the data set
is; windows where the face leaves the frame; the answer of a short recording; several recordings, one bad;
memory over a long recording; audio-only and regression models. The tiny model of tests/test_finetune.py: a
window is 4 frames 2 apart, 8 ticks (0.32 s at 25 fps), one every 4 ticks."""

import csv
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import finetune
from conftest import needs_extra
from test_finetune import TINY, args_for, random_checkpoint
from tools import face_clips
from tools.demo_data import recording_agreement, write_demo_recording

SPAN, HOP, FPS = 8, 4, 25  # the tiny model's window and default hop, in ticks of the timeline
REPOSITORY = Path(__file__).resolve().parents[1]


def chirp(seconds, rate=16000):
    """A rising tone (1, n): every window of it sounds different."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 + 60 * t) * t)).astype(np.float32)[None]


def read_timeline(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def window_starts(num_ticks):
    """The first tick of each window of a recording of num_ticks ticks: every HOP ticks while a window fits,
    then one that ends with the recording."""
    starts = list(range(0, num_ticks - SPAN + 1, HOP))
    return starts + ([num_ticks - SPAN] if starts[-1] + SPAN < num_ticks else [])


def regression_checkpoint(path):
    args = args_for(*TINY)
    args.task, args.num_outputs, args.class_names = "regression", 3, ["arousal", "valence", "dominance"]
    model = finetune.build_model(args)
    torch.save(dict(model=model.state_dict(), model_config=asdict(model.cfg), args=vars(args)), path)
    return str(path)


def test_a_window_is_classified_as_its_clip_through_the_data_set(media, tmp_path):
    """Window k of the timeline: its frames decoded as the data set decodes them (data.VideoFile), saved
    losslessly as a frame folder with the window's audio beside it, tested through data.FinetuneDataset (one
    clip, one crop) give the probabilities and features of the timeline's row k."""
    recording = media.video("talk.mp4", 100, audio=("aac", 16000, chirp(4.0)))
    checkpoint = random_checkpoint(tmp_path / "av.pth", "av")
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", checkpoint, "--video", recording, "--face_crop", "off", "--features",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    rows = read_timeline(out / "talk.timeline.csv")
    assert [float(r["start_s"]) for r in rows] == [s / FPS for s in window_starts(100)]
    assert all(r["face"] == "" for r in rows)  # not looked for
    features = np.load(out / "talk.features.npy")
    assert features.shape == (len(rows), 4 * 32)

    model, run = evaluate.load_finetuned(checkpoint)
    waveform = data.read_audio(recording)
    for k in (0, 3, len(rows) - 1):
        start = round(float(rows[k]["start_s"]) * FPS)
        folder = tmp_path / f"window{k}"
        folder.mkdir()
        # the window's span, 8 ticks: 9 frames (the audio ends at the 9th), 8 for the last window (it ends with
        # the recording); either way the folder's last frame is at the audio's end, as a frame folder maps them
        span = list(range(start, min(start + SPAN, 99) + 1))
        with data.VideoFile(recording) as video:
            frames = video.read(span)
        assert media.ids(frames) == span
        for i, frame in enumerate(frames.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(frame).save(folder / f"{i:03d}.png")
        audio = waveform[:, start * 640:(start + SPAN) * 640]  # 640 samples a tick at 16 kHz and 25 fps
        wav = media.audio(f"window{k}.wav", 16000, audio.numpy(), codec="pcm_f32le")  # lossless
        dataset = data.FinetuneDataset([data.Sample(str(folder), wav, None, None)], model.cfg, train=False,
                                       sampling_rate=run["sampling_rate"], num_clips=1, num_crops=1)
        item = dataset[0]
        scores, feature = evaluate.view_means(model, item["video"][None], item["audio"][None], "classification",
                                              "cpu")
        written = torch.tensor([float(rows[k][name]) for name in ("neutral", "happy", "sad", "angry")])
        assert torch.allclose(scores[0], written, atol=1e-6), (k, scores, written)
        assert torch.allclose(feature[0], torch.from_numpy(features[k]), atol=1e-5)


def test_a_short_recording_gets_the_answer_of_a_test_clip(media, tmp_path, capsys):
    """Shorter than two windows: its 2 clips x 2 crops, as data.FinetuneDataset and evaluate.predict test it."""
    recording = media.video("short.mp4", 12, audio=("aac", 16000, chirp(0.5)))
    checkpoint = random_checkpoint(tmp_path / "av.pth", "av")
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", checkpoint, "--video", recording, "--face_crop", "off",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{recording}: 2 clips x 2 crops"
    model, run = evaluate.load_finetuned(checkpoint)
    args = evaluate.build_parser().parse_args(["--checkpoint", checkpoint, "--num_clips", "2", "--num_crops", "2",
                                               "--num_workers", "0"])
    loader = evaluate.test_loader([data.Sample(recording, None, None, None)], model.cfg, run["sampling_rate"], args)
    _, expected, _ = evaluate.predict(model, loader, "classification", "cpu")
    names = ["neutral", "happy", "sad", "angry"]
    shown = {line.split()[0]: float(line.split()[1]) for line in printed[1:5]}
    assert all(math.isclose(shown[name], expected[0, c].item(), abs_tol=5e-5) for c, name in enumerate(names))
    row, = read_timeline(out / "short.timeline.csv")  # one row: the whole recording
    assert (row["start_s"], row["end_s"]) == ("0.0000", f"{12 / FPS:.4f}")
    assert torch.allclose(torch.tensor([float(row[n]) for n in names]), expected[0], atol=1e-6)
    assert not (out / "short.timeline.png").exists()


@needs_extra
def test_windows_without_the_face_are_not_classified(tmp_path, capsys):
    """A real face (tests/fixtures/face.jpg moving by known rolls, scales and shifts) for 4 s, then a grey frame
    until 9 s, then the face again until 12 s: the windows wholly in the gap have no face and no probabilities,
    those wholly outside it a face in every frame; each window starts at a frame's timestamp; the PNG is grey
    in the gap."""
    face = Image.open(face_clips.FACE).convert("RGB")
    blank = Image.new("RGB", (face_clips.WIDTH, face_clips.HEIGHT), face_clips.BACKGROUND)
    images = [blank if 100 <= k < 225 else face_clips.frame(face, *face_clips.motion(k, 300)) for k in range(300)]
    recording = face_clips.write_video(tmp_path / "interview.mp4", images, fps=FPS)
    checkpoint = random_checkpoint(tmp_path / "video.pth", "video")
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", checkpoint, "--video", recording, "--output_dir", str(out),
                          "--device", "cpu"]) == 0  # --face_crop auto: a video file's faces are aligned
    rows = read_timeline(out / "interview.timeline.csv")
    with av.open(recording) as container:
        timestamps = {round(float(frame.time), 4) for frame in container.decode(video=0)}
    assert len(timestamps) == 300 and all(float(r["start_s"]) in timestamps for r in rows)
    assert [round(float(r["start_s"]) * FPS) for r in rows] == window_starts(300)
    inside = [r for r in rows if float(r["start_s"]) >= 4 and float(r["end_s"]) <= 9]
    outside = [r for r in rows if float(r["end_s"]) <= 4 or float(r["start_s"]) >= 9]
    assert len(inside) >= 12 and len(outside) >= 30
    names = ("neutral", "happy", "sad", "angry")
    assert all(float(r["face"]) == 0 and all(r[n] == "" for n in names) for r in inside)
    assert all(float(r["face"]) == 1 and math.isclose(sum(float(r[n]) for n in names), 1, abs_tol=1e-4)
               for r in outside)
    faced = sum(float(r["face"]) > 0 for r in rows)
    assert f"{recording}: 12.0 s, {len(rows)} windows, {faced} with a face: " in capsys.readouterr().out
    png = np.asarray(Image.open(out / "interview.timeline.png").convert("RGB"))
    x = round(56 + 6.5 / 12 * (1000 - 170 - 56))  # the plot spans x 56 to 830 for 0 to 12 s
    assert tuple(png[40, x]) == (225, 225, 225) and tuple(png[40, round(56 + 2 / 12 * 774)]) == (255, 255, 255)


def test_without_the_extra_aligning_stops_in_one_line(media, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    monkeypatch.setattr(evaluate, "_FACE_MODELS", None)
    checkpoint = random_checkpoint(tmp_path / "video.pth", "video")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", checkpoint, "--video", media.video("clip.mp4", 30), "--device", "cpu"])
    assert str(exit_info.value.code) == (
        "evaluate.py: --face_crop auto (video files are aligned as the training crops were): aligning faces needs "
        "dlib and its 68-point landmark model: pip install -r requirements-faces.txt, or --face_crop off")


def test_several_recordings_one_bad(media, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    media.root = folder
    for name in ("a.mp4", "b.mkv"):
        media.video(name, 60, audio=("aac", 16000, chirp(2.4)))
    media.file("c.mp4", b"not a video")
    (folder / "notes.txt").write_text("not a recording")
    checkpoint = random_checkpoint(tmp_path / "av.pth", "av")
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", checkpoint, "--video", str(folder), "--face_crop", "off",
                          "--output_dir", str(out), "--device", "cpu"]) == 1
    printed = capsys.readouterr()
    assert printed.err == f"evaluate.py: {folder / 'c.mp4'}: not a media file FFmpeg can read (11 bytes)\n"
    assert sorted(p.name for p in out.iterdir()) == ["a.timeline.csv", "a.timeline.png", "b.timeline.csv",
                                                      "b.timeline.png"]
    lines = printed.out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [str(folder / "a.mp4"), str(folder / "b.mkv")]
    assert lines[0].startswith(f"{folder / 'a.mp4'}: 2.4 s, {len(window_starts(60))} windows: ")
    assert lines[-1] == f"2 of 3 recordings done; their timelines are in {out}/"


def test_audio_and_regression_models_give_timelines_of_their_shape(media, tmp_path, capsys):
    wav = media.audio("voice.wav", 16000, chirp(3.0))
    out = tmp_path / "out"
    checkpoint = random_checkpoint(tmp_path / "audio.pth", "audio")
    assert evaluate.main(["--checkpoint", checkpoint, "--audio", wav, "--output_dir", str(out), "--device", "cpu"]) == 0
    rows = read_timeline(out / "voice.timeline.csv")
    assert list(rows[0]) == ["start_s", "end_s", "face", "neutral", "happy", "sad", "angry"]
    assert [round(float(r["start_s"]) * FPS) for r in rows] == window_starts(75)  # 3 s of audio: 75 ticks
    assert all(r["face"] == "" and math.isclose(sum(float(r[n]) for n in list(r)[3:]), 1, abs_tol=1e-4)
               for r in rows)

    recording = media.video("talk.mp4", 50, audio=("aac", 16000, chirp(2.0)))
    checkpoint = regression_checkpoint(tmp_path / "regression.pth")
    assert evaluate.main(["--checkpoint", checkpoint, "--video", recording, "--face_crop", "off",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    rows = read_timeline(out / "talk.timeline.csv")
    assert list(rows[0]) == ["start_s", "end_s", "face", "arousal", "valence", "dominance"]
    assert len(rows) == len(window_starts(50))
    assert all(math.isfinite(float(r[n])) for r in rows for n in ("arousal", "valence", "dominance"))
    assert (out / "talk.timeline.png").exists()
    assert f"{recording}: 2.0 s, {len(rows)} windows: arousal " in capsys.readouterr().out


PEAK_RSS = """
import resource, sys
sys.path.insert(0, {root!r})
import evaluate
code = evaluate.main(sys.argv[1:])
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB", code)
"""


def test_memory_stays_bounded_over_a_long_recording(media, tmp_path):
    """Peak memory of the whole process for 3 minutes of 160 x 120 video with audio (4,500 frames: 260 MB if
    held) stays within 40 MB of that for 12 s of the same."""
    checkpoint = random_checkpoint(tmp_path / "av.pth", "av")
    peaks = []
    for seconds in (12, 180):
        recording = media.video(f"talk{seconds}.mp4", seconds * FPS, audio=("aac", 16000, chirp(seconds)),
                                width=160, height=120, options={"preset": "ultrafast"})
        run = subprocess.run([sys.executable, "-c", PEAK_RSS.format(root=str(REPOSITORY)), "--checkpoint", checkpoint,
                              "--video", recording, "--face_crop", "off", "--hop", "2", "--output_dir",
                              str(tmp_path / "out"), "--device", "cpu", "--num_workers", "0"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        peak, code = run.stdout.split()[-3], run.stdout.split()[-1]
        assert code == "0"
        peaks.append(int(peak))
    assert peaks[1] - peaks[0] < 40, peaks


def test_the_demo_recording_and_its_agreement_figure(tmp_path):
    """The demo writer's recording: 40 s of video and audio, its four segments named; a window counts for the
    agreement figure when it lies wholly inside a segment and has a face, and agrees when its top class is the
    segment's emotion."""
    path = write_demo_recording(tmp_path)
    with data.VideoFile(path, audio=True) as video:
        assert len(video) == 1000 and abs(video.audio.num_samples - 40 * 16000) < 2048
    segments = tmp_path / "recording.csv"
    assert segments.read_text().splitlines() == ["start_s,end_s,emotion", "0,10,neutral", "10,20,happy",
                                                 "20,30,sad", "30,40,angry"]
    timeline = tmp_path / "recording.timeline.csv"
    timeline.write_text("start_s,end_s,face,neutral,happy,sad,angry\n"
                        "0.0000,2.5600,,0.7,0.1,0.1,0.1\n"  # inside neutral, agrees
                        "8.9600,11.5200,,0.7,0.1,0.1,0.1\n"  # across two segments: not counted
                        "10.2400,12.8000,0.5,0.1,0.6,0.2,0.1\n"  # inside happy, agrees
                        "20.4800,23.0400,0.0,,,,\n"  # no face: not counted
                        "21.7600,24.3200,,0.1,0.6,0.2,0.1\n")  # inside sad, does not agree
    assert recording_agreement(timeline, segments) == (2, 3)


def test_the_authors_fine_tuned_checkpoint_on_a_long_frame_folder(tmp_path, capsys):
    """Their checkpoint (the tiny fixture, 4 heads) on 150 OpenFace-style frames (their 75, twice) with 6 s of
    audio: a frame folder is taken as the crops it is (--face_crop auto), its frames 1 / 25 s apart."""
    media = Path(__file__).parent / "fixtures" / "authors_test_views_media"
    folder = tmp_path / "long"
    folder.mkdir()
    frames = sorted((media / "1001_DFA_ANG_XX").iterdir())
    for i, frame in enumerate(frames + frames):
        (folder / f"frame_det_00_{i + 1:06d}{frame.suffix}").write_bytes(frame.read_bytes())
    voice = data.read_audio(str(media / "1001_DFA_ANG_XX.wav"))[:, :3 * 16000]
    wav = tmp_path / "long.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(torch.cat([voice, voice], 1).numpy(), format="flt", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", str(Path(__file__).parent / "fixtures" /
                                             "official_tiny_finetuned_checkpoint-best.pth"), "--heads", "4",
                          "--video", str(folder), "--audio", str(wav), "--output_dir", str(out), "--device", "cpu"]) == 0
    rows = read_timeline(out / "long.timeline.csv")
    # their geometry, 16 frames 4 apart: a window every 32 ticks, the last one ending with the 150th frame
    assert [round(float(r["start_s"]) * FPS) for r in rows] == [0, 32, 64, 86]
    assert all(r["face"] == "" and math.isclose(sum(float(r[c]) for c in "01234"), 1, abs_tol=1e-4) for r in rows)
    assert float(rows[-1]["end_s"]) == 150 / FPS
    assert f"{folder}: 6.0 s, 4 windows: " in capsys.readouterr().out
