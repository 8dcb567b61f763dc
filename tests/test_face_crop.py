"""tools/face_crop.py: OpenFace's alignment on a real face (tests/fixtures/face.jpg, a public-domain NASA photo)
moved through a video by known rolls, scales and shifts; failures named; reruns; the message without the extra."""

import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import evaluate
from tools import face_clips, face_crop
from tools.face_clips import FACE, PUPILS

from conftest import needs_extra


SIZE = 256
SIM_SCALE = SIZE * 0.7 / 112  # OpenFace's -simsize 256: pixels per mm of its mean face
# Where OpenFace's alignment puts the eyes: the centres of the mean face's eye outlines (landmarks 36-41 and
# 42-47, from tools/openface_mean_shape_68.txt, the PDM's numbers), scaled, about the middle pixel.
MEAN_FACE = np.loadtxt(Path(face_crop.__file__).with_name("openface_mean_shape_68.txt"))[:, :2]
EXPECTED_EYES = np.stack([MEAN_FACE[36:42].mean(0), MEAN_FACE[42:48].mean(0)]) * SIM_SCALE + SIZE // 2


# ----------------------------------------------------------------------------------------------
# The geometry, without dlib

def test_alignment_undoes_a_known_similarity():
    """Landmarks that are OpenFace's mean face rolled, scaled and moved land exactly on the mean face at
    OpenFace's scale, about the middle pixel."""
    for roll, scale, shift in [(25, 0.8, (300, 170)), (-25, 1.25, (150, 220)), (0, 1.0, (240, 180))]:
        r = math.radians(roll)
        m = 2.0 * scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])
        landmarks = MEAN_FACE @ m.T + shift
        a, b = evaluate.alignment(landmarks, SIM_SCALE, SIZE)
        np.testing.assert_allclose(landmarks @ a.T + b, MEAN_FACE * SIM_SCALE + SIZE // 2, atol=1e-9)
        assert math.isclose(math.degrees(math.atan2(a[1, 0], a[0, 0])), roll, abs_tol=1e-9)  # turned back upright
        assert math.isclose(np.linalg.det(a), (SIM_SCALE / (2 * scale)) ** 2, rel_tol=1e-9)


def test_warp_moves_a_pixel_where_the_matrix_says():
    """warp(image, A, b) samples image at A^-1 (x - b) with pixel centres at integers, as OpenCV's warpAffine."""
    image = np.zeros((60, 80), np.uint8)
    image[21, 37] = 255  # x 37, y 21
    r = math.radians(30)
    a = 1.5 * np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    b = np.array([40.0, 10.0]) - a @ (37, 21) + (0.0, 30.0)  # pixel (37, 21) goes to (40, 40)
    out = np.asarray(evaluate.warp(Image.fromarray(image), a, b, 80)).astype(float)
    y, x = np.unravel_index(out.argmax(), out.shape)
    assert (x, y) == (40, 40)
    weights = out / out.sum()
    centre = (weights.sum(0) @ np.arange(80), weights.sum(1) @ np.arange(80))  # the blob's centre of mass
    np.testing.assert_allclose(centre, (40, 40), atol=0.05)


def test_without_the_extra_one_line_says_what_to_install(media, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    monkeypatch.setattr(evaluate, "_FACE_MODELS", None)
    with pytest.raises(SystemExit) as exit_info:
        face_crop.main([media.video("clip.mp4", 5), "--out", str(tmp_path / "faces")])
    message = str(exit_info.value.code)
    assert message == "tools/face_crop.py needs dlib and its 68-point landmark model: " \
                      "pip install -r requirements-faces.txt"
    assert not (tmp_path / "faces").exists()


def test_progress_line_times():
    assert [data._duration(s) for s in (0.4, 42, 192, 18420)] == ["0 s", "42 s", "3 min 12 s", "5 h 07 min"]


# ----------------------------------------------------------------------------------------------
# A real face through a real video

def _eye_template(face, pupil, g, half=(24, 14)):
    """The grayscale neighbourhood of a pupil of FACE, scaled by g, the pupil at the centre pixel."""
    offset = pupil + 0.5 - (np.array(half) + 0.5) / g  # Pillow's pixel centres are at +0.5
    size = (2 * half[0] + 1, 2 * half[1] + 1)
    out = face.transform(size, Image.Transform.AFFINE, (1 / g, 0, offset[0], 0, 1 / g, offset[1]),
                         Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float64)


def _best_match(image, template, around, reach=20):
    """The centre (x, y) of the window within `reach` pixels of `around` that best matches the template
    (normalised cross-correlation), and the correlation."""
    th, tw = template.shape
    x0, y0 = int(round(around[0])) - reach - tw // 2, int(round(around[1])) - reach - th // 2
    region = image[y0:y0 + 2 * reach + th, x0:x0 + 2 * reach + tw]
    windows = np.lib.stride_tricks.sliding_window_view(region, template.shape)
    w = windows - windows.mean(axis=(2, 3), keepdims=True)
    t = template - template.mean()
    ncc = (w * t).sum(axis=(2, 3)) / np.sqrt((w ** 2).sum(axis=(2, 3)) * (t ** 2).sum())
    y, x = np.unravel_index(ncc.argmax(), ncc.shape)
    return np.array([x0 + x + tw // 2, y0 + y + th // 2]), ncc[y, x]


@needs_extra
def test_aligned_frames_of_a_moving_face(tmp_path, capsys):
    """30 frames rolled up to +-25 degrees, scaled 0.8 to 1.25 and shifted: every frame is written, and in
    every aligned frame the eyes are level, where OpenFace's mean face puts them, at the same place."""
    clip = tmp_path / "clips" / "astronaut.flv"
    clip.parent.mkdir()
    moves = face_clips.write_clip(clip, 30)
    rolls, scales = [m[0] for m in moves], [m[1] for m in moves]
    assert max(rolls) > 24 and min(rolls) < -24 and max(scales) > 1.24 and min(scales) < 0.81
    assert face_crop.main([str(clip.parent), "--out", str(tmp_path / "faces")]) == 0
    out = capsys.readouterr().out
    assert "1 clips cropped, 30 frames (0 without a detection" in out

    folder = tmp_path / "faces" / "astronaut"
    assert sorted(os.listdir(folder)) == [f"frame_det_00_{i:06d}.jpg" for i in range(1, 31)]
    face = Image.open(FACE).convert("L")
    g = np.linalg.norm(EXPECTED_EYES[1] - EXPECTED_EYES[0]) / np.linalg.norm(PUPILS[1] - PUPILS[0])
    templates = [_eye_template(face, pupil, g) for pupil in PUPILS]
    eyes = []
    for name in sorted(os.listdir(folder)):
        image = Image.open(folder / name)
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        gray = np.asarray(image.convert("L"), dtype=np.float64)
        found = [_best_match(gray, t, e) for t, e in zip(templates, EXPECTED_EYES)]
        assert min(score for _, score in found) > 0.8, name  # the eyes are there
        eyes.append([position for position, _ in found])
    eyes = np.array(eyes, dtype=np.float64)  # (frame, eye, xy)
    line = eyes[:, 1] - eyes[:, 0]
    angles = np.degrees(np.arctan2(line[:, 1], line[:, 0]))
    assert np.abs(angles).max() < 3  # level, though the face was rolled by up to 25 degrees
    spread = np.abs(eyes - np.median(eyes, axis=0)).max()
    assert spread <= 3  # the same place in every frame: the rolls, scales and shifts are undone
    assert np.abs(np.median(eyes, axis=0) - EXPECTED_EYES).max() <= 6  # where OpenFace's mean face has them


@pytest.fixture
def crema(tmp_path):
    """Two CREMA-D-shaped clips of 10 frames (VideoFlash/*.flv, AudioWAV/*.wav)."""
    names = face_clips.write_set(tmp_path / "CREMA-D", num=2, num_frames=10)
    return tmp_path / "CREMA-D", names


@needs_extra
def test_failures_are_named_get_no_folder_and_exit_1(crema, tmp_path, capsys):
    root, names = crema
    videos = root / "VideoFlash"
    blank = Image.new("RGB", (face_clips.WIDTH, face_clips.HEIGHT), face_clips.BACKGROUND)
    face_clips.write_video(videos / "1001_DFA_FEA_XX.flv", [blank] * 5)  # no face
    (videos / "1001_DFA_HAP_XX.flv").write_bytes(b"not a video at all")  # undecodable
    whole = (videos / f"{names[0]}.flv").read_bytes()
    (videos / "1001_DFA_SAD_XX.flv").write_bytes(whole[:len(whole) // 2])  # cut short
    face = Image.open(FACE).convert("RGB")
    shown = [face_clips.frame(face, *face_clips.motion(k, 10)) for k in range(10)]
    face_clips.write_video(videos / "1001_DFA_NEU_XX.flv", shown[:4] + [blank] * 3 + shown[7:])  # a gap
    faces = tmp_path / "faces"
    assert face_crop.main([str(videos), "--out", str(faces)]) == 1
    printed = capsys.readouterr()
    out = printed.out.splitlines()
    assert re.fullmatch(r"face_crop: 6/6 \(3 failed\), [0-9.]+ frames/s, 0 s left", printed.err.splitlines()[-1])
    assert f"{videos / '1001_DFA_FEA_XX.flv'}: no face found in any of its 5 frames" in out
    assert f"{videos / '1001_DFA_HAP_XX.flv'}: not a media file FFmpeg can read (18 bytes)" in out
    assert any(line.startswith(f"{videos / '1001_DFA_SAD_XX.flv'}: truncated: ") and
               line.endswith("frames decoded, its header announces 0.33 s at 30 frames/s") for line in out)
    assert "3 clips cropped, 30 frames (3 without a detection: they took the landmarks of their nearest frame " \
           "with one), 3 failed" in out
    assert sorted(os.listdir(faces)) == names + ["1001_DFA_NEU_XX"]  # none for the three, nothing partial left
    assert all(len(os.listdir(faces / name)) == 10 for name in names + ["1001_DFA_NEU_XX"])


@needs_extra
def test_rerun_skips_finished_clips_and_an_interrupted_clip_leaves_no_folder(crema, tmp_path, monkeypatch, capsys):
    root, names = crema
    faces = tmp_path / "faces"
    write, written = face_crop._write, []

    def interrupted(image, landmarks, size, path):
        written.append(path)
        if len(written) == 15:  # the 5th frame of the second clip
            raise KeyboardInterrupt
        write(image, landmarks, size, path)

    monkeypatch.setattr(face_crop, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        face_crop.main([str(root / "VideoFlash"), "--out", str(faces)])
    assert os.listdir(faces) == [names[0]] and len(os.listdir(faces / names[0])) == 10
    monkeypatch.setattr(face_crop, "_write", write)

    (faces / names[0] / "frame_det_00_000001.jpg").write_bytes(b"kept")  # a finished clip is not redone
    (faces / f".{names[1]}.partial").mkdir()  # what a killed run leaves
    (faces / f".{names[1]}.partial" / "frame_det_00_000001.jpg").write_bytes(b"stale")
    capsys.readouterr()
    assert face_crop.main([str(root / "VideoFlash"), "--out", str(faces)]) == 0
    assert f"2 clips: 1 already in {faces}, 1 to crop" in capsys.readouterr().out
    assert sorted(os.listdir(faces)) == names
    assert (faces / names[0] / "frame_det_00_000001.jpg").read_bytes() == b"kept"
    assert len(os.listdir(faces / names[1])) == 10

    # The folders are what data.py crema-d --videos reads: frame folders of 10 aligned frames.
    assert data.crema_d(root, tmp_path / "folds", faces) == 0
    rows = [row.split() for row in (tmp_path / "folds" / "split01" / "test.csv").read_text().splitlines()]
    assert [Path(video) for video, _, _ in rows] == [faces / name for name in names]
    with data.open_video(rows[1][0]) as video:
        assert len(video) == 10 and video.read([0, 9]).shape == (2, 3, SIZE, SIZE)


def test_a_folder_without_videos_is_an_error_naming_it(crema, tmp_path):
    """The CREMA-D root holds its clips one folder down: naming the root must not crop nothing quietly."""
    root, _ = crema
    with pytest.raises(SystemExit, match=f"face_crop.py: {re.escape(str(root))}: no video files in this folder"):
        face_crop.main([str(root), "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()
