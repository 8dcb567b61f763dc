"""data.py folders: class folders ROOT/<class>/<clip> become manifests, classes.txt and a split (or folds) that
keeps each speaker (--group) on one side; face crops from --videos; bad input named. Real (tiny) media files:
the clips are probed."""

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import data

SPEAKERS = [f"spk{s:02d}" for s in range(1, 7)]
TAKES = {"sad": 2, "angry": 3, "happy": 4}  # written in this order; the class indices follow the sorted names
CLASSES = ["angry", "happy", "sad"]
GROUP = r"^(spk\d+)_"


def speaker(path):
    return Path(path).name.split("_")[0]


@pytest.fixture
def tree(media):
    """(root, {name: (video, audio, class index)}): 6 speakers x TAKES[class] clips per class. Take 1 of spk01 is a
    frame folder with its wav, of spk02 a video without sound with its wav, of spk03 an .MP4; the rest are .mp4
    with their own audio. Three other files lie about."""
    voice = media.tone(0.4, 16000, [0.5])
    sources = {"av": media.video("av.mp4", 8, audio=("aac", 16000, voice)), "silent": media.video("silent.mp4", 8),
               "wav": media.audio("voice.wav", 16000, voice)}
    root, expected = media.root / "clips", {}
    for cls, takes in TAKES.items():
        (root / cls).mkdir(parents=True)
        for spk in SPEAKERS:
            for take in range(1, takes + 1):
                name, label = f"{spk}_{cls}_take{take}", CLASSES.index(cls)
                base = root / cls / name
                if (spk, take) == ("spk01", 1):
                    media.frames(f"clips/{cls}/{name}", 8)
                    expected[name] = (str(base), f"{base}.wav", label)
                elif (spk, take) == ("spk02", 1):
                    shutil.copy(sources["silent"], f"{base}.mp4")
                    expected[name] = (f"{base}.mp4", f"{base}.wav", label)
                else:
                    ext = ".MP4" if (spk, take) == ("spk03", 1) else ".mp4"
                    shutil.copy(sources["av"], f"{base}{ext}")
                    expected[name] = (f"{base}{ext}", f"{base}{ext}", label)
                if expected[name][1].endswith(".wav"):
                    shutil.copy(sources["wav"], expected[name][1])
    for other in ("README.txt", "happy/notes.txt", "sad/orphan.wav"):
        (root / other).write_text("not a clip\n")
    return root, expected


def rows(path):
    return [tuple(line.split()) for line in Path(path).read_text().splitlines()]


def as_rows(expected):
    return {(video, audio, str(label)) for video, audio, label in expected.values()}


def test_class_folders_become_rows_classes_and_a_split_by_clip(tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "out"
    assert data.main(["folders", str(root), "--out", str(out)]) == 0
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    train, test = rows(out / "train.csv"), rows(out / "test.csv")
    assert len(train) + len(test) == len(expected) == 54
    assert set(train) | set(test) == as_rows(expected)
    printed = capsys.readouterr().out
    assert "the split is by clip, not by speaker" in printed
    wavs = sum(audio.endswith(".wav") for _, audio, _ in expected.values())
    assert wavs == 6 and printed.splitlines()[-1] == (f"0 clips left out, {wavs} with a wav beside them; other "
                                                      f"entries ignored: 3 (e.g. {root}/README.txt)")
    for fraction in (0.2, 0.3, 0.5):
        for seed in (0, 1):
            split = tmp_path / f"f{fraction}_s{seed}"
            data.main(["folders", str(root), "--out", str(split), "--test_fraction", str(fraction),
                       "--seed", str(seed)])
            train, test = rows(split / "train.csv"), rows(split / "test.csv")
            assert set(train) | set(test) == as_rows(expected) and not set(train) & set(test)
            for label, cls in enumerate(CLASSES):
                num = len(SPEAKERS) * TAKES[cls]
                num_test = sum(row[2] == str(label) for row in test)
                assert abs(num_test - fraction * num) < 1, (fraction, seed, cls, num_test)
    assert rows(tmp_path / "f0.2_s0" / "test.csv") == rows(out / "test.csv")  # the same seed, the same split
    assert set(rows(tmp_path / "f0.2_s1" / "test.csv")) != set(rows(out / "test.csv"))


def split_line(printed, split):
    return next(line for line in printed.splitlines() if line.startswith(f"{split}: "))


def test_group_keeps_each_speaker_on_one_side_of_every_fold(tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "folds"
    assert data.main(["folders", str(root), "--out", str(out), "--folds", "3", "--group", GROUP]) == 0
    printed = capsys.readouterr().out
    assert f"split by --group '{GROUP}': 6 groups, each on one side of every split" in printed
    tested = Counter()
    for k in (1, 2, 3):
        split = out / f"split0{k}"
        train, test = rows(split / "train.csv"), rows(split / "test.csv")
        assert set(train) | set(test) == as_rows(expected) and len(train) + len(test) == len(expected)
        train_speakers, test_speakers = {speaker(r[0]) for r in train}, {speaker(r[0]) for r in test}
        assert not train_speakers & test_speakers
        assert {r[2] for r in test} == {"0", "1", "2"}  # every class in every test fold
        assert (split / "classes.txt").read_text().splitlines() == CLASSES
        assert split_line(printed, split).startswith(f"{split}: {len(train)} train ({len(train_speakers)} groups) "
                                                     f"and {len(test)} test ({len(test_speakers)} groups) clips")
        tested.update(test)
    assert set(tested) == as_rows(expected) and set(tested.values()) == {1}  # each clip in exactly one test fold


def test_group_in_a_single_split(tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "out"
    assert data.main(["folders", str(root), "--out", str(out), "--group", GROUP, "--test_fraction", "0.3"]) == 0
    train, test = rows(out / "train.csv"), rows(out / "test.csv")
    assert set(train) | set(test) == as_rows(expected)
    assert not {speaker(r[0]) for r in train} & {speaker(r[0]) for r in test}
    assert {r[2] for r in train} == {r[2] for r in test} == {"0", "1", "2"}
    assert "not by speaker" not in capsys.readouterr().out


def test_videos_take_the_face_crops_and_name_a_clip_without_them(tree, tmp_path, capsys):
    root, expected = tree
    faces = tmp_path / "faces"
    for name in expected:
        if name != "spk04_sad_take2":
            (faces / name).mkdir(parents=True)
            (faces / name / "frame_det_00_000001.jpg").write_bytes(b"")  # only listed, never decoded here
    out = tmp_path / "out"
    assert data.main(["folders", str(root), "--out", str(out), "--videos", str(faces)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{root}/sad/spk04_sad_take2.mp4: no face crops: {faces}/spk04_sad_take2 is missing "
                        "(tools/face_crop.py names the clips it could not crop)")
    assert lines[-1].startswith("1 clip left out (named above: 0 unreadable, 1 without face crops)")
    got = set(rows(out / "train.csv")) | set(rows(out / "test.csv"))
    assert got == {(f"{faces}/{name}", audio, str(label)) for name, (_, audio, label) in expected.items()
                   if name != "spk04_sad_take2"}  # the audio stays the clip's own (or its wav)


def test_an_unreadable_clip_is_named_counted_and_skipped(tree, tmp_path, capsys):
    root, expected = tree
    (root / "angry" / "spk05_angry_take9.mp4").write_bytes(b"not a video\n" * 10)
    (root / "angry" / "spk06_angry_take9.mp4").write_bytes((root / "angry" / "spk02_angry_take1.wav").read_bytes())
    (root / "happy" / "spk02_happy_take1.wav").unlink()  # a silent video without its wav
    (root / "happy" / "spk01_happy_take1.wav").unlink()  # a frame folder without its wav
    out = tmp_path / "out"
    assert data.main(["folders", str(root), "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"{root}/angry/spk05_angry_take9.mp4: not a media file FFmpeg can read (120 bytes)",
        f"{root}/angry/spk06_angry_take9.mp4: no video stream",
        f"{root}/happy/spk01_happy_take1: a frame folder without its audio: put it beside it as spk01_happy_take1.wav",
        f"{root}/happy/spk02_happy_take1.mp4: no audio stream (and no spk02_happy_take1.wav beside it)"]
    assert lines[-1].startswith("4 clips left out (named above: 4 unreadable, 0 without face crops)")
    got = set(rows(out / "train.csv")) | set(rows(out / "test.csv"))
    assert got == as_rows({k: v for k, v in expected.items() if k not in ("spk01_happy_take1", "spk02_happy_take1")})


def bad_tree(tmp_path, names):
    """Class folders of empty files (a structural error stops before any file is opened)."""
    root = tmp_path / "clips"
    for name in names:
        folder = root / name if name.endswith("/") else (root / name).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            (root / name).touch()
    return root


@pytest.mark.parametrize("names, flags, message", [
    (["happy/a.mp4", "sad/"], [], "{root}/sad: an empty class folder: no video file and no frame folder in it"),
    (["happy/spk01_a.mp4", "sad/spk01_a.avi"], [],
     "{root}/happy/spk01_a.mp4 and {root}/sad/spk01_a.avi: two clips named spk01_a (1 in all share"),
    (["happy/a.mp4", "happy/a/x.jpg"], [], "{root}/happy/a and {root}/happy/a.mp4: two clips named a"),
    (["happy/spk01_a.mp4", "happy/take2.mp4"], ["--group", GROUP],
     f"{{root}}/happy/take2.mp4: the name take2 does not match --group '{GROUP}' (1 of 2 clips do not)"),
    (["notes.txt"], [], "{root}: no class folders in it"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, names, flags, message):
    root = bad_tree(tmp_path, names)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=re.escape("data.py folders: " + message.format(root=root))):
        data.main(["folders", str(root), "--out", str(out)] + flags)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--folds", "4"], "{root}/sad: 3 usable clips, too few for 4 folds (every fold's test set needs one of each "
                       "class)"),
    (["--group", GROUP], "{root}/sad: 3 usable clips of 1 group (--group), too few for a train and a test side"),
    (["--folds", "3", "--group", GROUP], "{root}/happy: 4 usable clips of 2 groups (--group), too few for 3 folds"),
])
def test_a_class_too_small_for_the_split_is_named(media, flags, message):
    src = media.video("av.mp4", 8, audio=("aac", 16000, media.tone(0.4, 16000, [0.5])))
    root = media.root / "clips"
    for name in ("happy/spk01_a", "happy/spk01_b", "happy/spk02_a", "happy/spk02_b",
                 "sad/spk03_a", "sad/spk03_b", "sad/spk03_c"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / f"{name}.mp4")
    with pytest.raises(SystemExit, match=re.escape("data.py folders: " + message.format(root=root))):
        data.main(["folders", str(root), "--out", str(media.root / "out")] + flags)


def test_a_class_of_two_speakers_gets_one_on_each_side(media, tmp_path):
    """At a test fraction of 0.2, neither of two equal speakers is nearer 20% than 0% of the class: the split
    still puts one on each side, as each class needs its first clip on both sides."""
    src = media.video("av.mp4", 8, audio=("aac", 16000, media.tone(0.4, 16000, [0.5])))
    root = media.root / "clips"
    for cls, speakers in (("happy", range(1, 11)), ("sad", (11, 12))):
        (root / cls).mkdir(parents=True)
        for spk in speakers:
            for take in (1, 2):
                shutil.copy(src, root / cls / f"spk{spk:02d}_{take}.mp4")
    out = tmp_path / "out"
    assert data.main(["folders", str(root), "--out", str(out), "--group", GROUP]) == 0
    train, test = rows(out / "train.csv"), rows(out / "test.csv")
    sad = {side: {speaker(r[0]) for r in part if r[2] == "1"} for side, part in (("train", train), ("test", test))}
    assert len(sad["train"]) == len(sad["test"]) == 1 and not sad["train"] & sad["test"]
    assert sum(r[2] == "0" for r in test) == 4  # happy: 2 of its 10 speakers, 20%


def test_groups_that_cannot_give_every_class_both_sides_are_named(media, tmp_path):
    """Three speakers of two classes each (a and b, b and c, a and c): the side that holds one speaker lacks a class."""
    src = media.video("av.mp4", 8, audio=("aac", 16000, media.tone(0.4, 16000, [0.5])))
    root = media.root / "clips"
    for spk, classes in (("spk01", "ab"), ("spk02", "bc"), ("spk03", "ac")):
        for cls in classes:
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / cls / f"{spk}_{cls}.mp4")
    with pytest.raises(SystemExit, match=rf"^data.py folders: {root}/[abc]: no clip in the (training|test) set: its "
                                         "groups went elsewhere with the other classes they hold"):
        data.main(["folders", str(root), "--out", str(tmp_path / "out"), "--group", GROUP])


@pytest.mark.parametrize("flags, error", [
    (["--folds", "3", "--test_fraction", "0.3"], "not allowed with argument"),
    (["--folds", "1"], "a number of folds, 2 or more, got 1"),
    (["--test_fraction", "1.5"], "a fraction between 0 and 1 (both excluded), got 1.5"),
    (["--group", "spk(\\d+"], "not a regular expression"),
])
def test_usage_errors(tmp_path, capsys, flags, error):
    with pytest.raises(SystemExit) as exit_:
        data.main(["folders", str(tmp_path), "--out", str(tmp_path / "out")] + flags)
    assert exit_.value.code == 2 and error in capsys.readouterr().err
