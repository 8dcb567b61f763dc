"""The CREMA-D recipe: `data.py crema-d` writes the authors' five folds (their clips, order, labels and
actor blocks, checked against their split files), `evaluate.py --summarize` the mean and sd over
folds (checked against metrics counted by hand), and the recipe end to end on a tiny stand-in."""

import gzip
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

import data
import evaluate
import finetune
from conftest import Media

FIXTURES = Path(__file__).parent / "fixtures" / "crema-d"
AUTHORS_ROOT = "/data/ycs/AC/Dataset/CREMA-D"  # the prefix of every path in the authors' files
# Not in the authors' files (CREMA-D's README lists the first four as broken; the fifth's wav was misnamed).
LEFT_OUT = {"1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX", "1064_IEO_DIS_MD", "1040_ITH_SAD_XX"}
CLASSES = ["anger", "disgust", "fear", "happy", "neutral", "sad"]
SPLITS = [(f"split0{k}", part) for k in range(1, 6) for part in ("train", "test")]


def authors_rows(split, part):
    return gzip.decompress((FIXTURES / split / f"{part}.csv.gz").read_bytes()).decode("ascii").splitlines()


def name_of(row):
    return row.split()[0].rsplit("/", 1)[1]


def written_rows(out, split, part):
    return (out / split / f"{part}.csv").read_text().splitlines()


# ----------------------------------------------------------------------------------------------
# data.py crema-d: the authors' folds

@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """Every CREMA-D clip as empty files: AudioWAV/NAME.wav, VideoFlash/NAME.flv, and faces/NAME/."""
    names = {name_of(row) for split, part in SPLITS for row in authors_rows(split, part)}
    assert len(names) == 7437
    names |= LEFT_OUT
    assert len(names) == 7442
    root = tmp_path_factory.mktemp("crema-d")
    for sub in ("AudioWAV", "VideoFlash", "faces"):
        (root / sub).mkdir()
    for name in names:
        (root / "AudioWAV" / f"{name}.wav").touch()
        (root / "VideoFlash" / f"{name}.flv").touch()
        (root / "faces" / name).mkdir()
    return root


def test_folds_equal_the_authors_files(standin, tmp_path, capsys):
    out = tmp_path / "folds"
    start = time.perf_counter()
    assert data.main(["crema-d", str(standin), "--out", str(out), "--videos", str(standin / "faces")]) == 0
    assert time.perf_counter() - start < 7.442  # well under a second per thousand clips: nothing is decoded
    for split, part in SPLITS:
        expected = [row.replace(f"{AUTHORS_ROOT}/face_aligned/", f"{standin}/faces/")
                    .replace(f"{AUTHORS_ROOT}/AudioWAV/", f"{standin}/AudioWAV/") for row in authors_rows(split, part)]
        assert written_rows(out, split, part) == expected, (split, part)
        assert (out / split / "classes.txt").read_text().split("\n") == CLASSES + [""]
    assert (out / "classes.txt").read_text().split("\n") == CLASSES + [""]
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("7437 clips of 91 actors written to ")
    assert "5 left out by the authors' rule, 0 missing their audio or video, 0 other names ignored" in summary
    assert set(data.CREMAD_LEFT_OUT) == LEFT_OUT


def test_the_authors_labels_and_actor_blocks():
    """The fixture itself: label i is the i-th emotion code; fold K tests actors 1001 + 18 (K - 1) onwards."""
    codes = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    for split, part in SPLITS:
        rows = authors_rows(split, part)
        assert all(codes[int(row.split()[2])] == name_of(row)[9:12] for row in rows)
        k = int(split[-1])
        actors = {int(name_of(row)[:4]) for row in rows}
        block = set(range(1001 + 18 * (k - 1), 1019 + 18 * (k - 1) + (k == 5)))
        assert actors == block if part == "test" else not actors & block


def test_without_videos_the_flv_files_are_the_videos(standin, tmp_path):
    out = tmp_path / "folds"
    assert data.main(["crema-d", str(standin), "--out", str(out)]) == 0
    for split, part in SPLITS:
        names = [name_of(row) for row in authors_rows(split, part)]
        videos = [row.split()[0] for row in written_rows(out, split, part)]
        assert videos == [f"{standin}/VideoFlash/{name}.flv" for name in names]


def small_tree(root, names):
    for sub in ("AudioWAV", "VideoFlash"):
        (root / sub).mkdir(parents=True)
    for name in names:
        (root / "AudioWAV" / f"{name}.wav").touch()
        (root / "VideoFlash" / f"{name}.flv").touch()
    return root


def test_a_missing_file_is_named_and_its_clip_left_out(tmp_path, capsys):
    names = ["1001_DFA_ANG_XX", "1001_DFA_DIS_XX", "1019_IEO_HAP_HI", "1040_ITH_SAD_XX", "1091_WSI_SAD_XX"]
    root = small_tree(tmp_path / "cremad", names)
    (root / "AudioWAV" / "1001_DFA_DIS_XX.wav").unlink()
    (root / "VideoFlash" / "1019_IEO_HAP_HI.flv").unlink()
    (root / "AudioWAV" / "1040_ITH_SAD_XX.wav").rename(root / "AudioWAV" / "1040_ITH_SAD_X.wav")  # as it once was
    (root / "VideoFlash" / "notes.txt").touch()
    (root / "VideoFlash" / "1091_WSI_SAD_XX").mkdir()  # a frame folder wins over the file
    out = tmp_path / "folds"
    assert data.main(["crema-d", str(root), "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{root}/AudioWAV/1001_DFA_DIS_XX.wav: no audio file for this clip",
                         f"{root}/VideoFlash/1019_IEO_HAP_HI: no video file or frame folder for this clip"]
    assert lines[2].startswith("2 clips of 2 actors written to ")
    assert lines[2].endswith("1 left out by the authors' rule, 2 missing their audio or video, 2 other names ignored")
    assert len(lines) == 3
    assert written_rows(out, "split01", "test") == [
        f"{root}/VideoFlash/1001_DFA_ANG_XX.flv {root}/AudioWAV/1001_DFA_ANG_XX.wav 0"]
    assert written_rows(out, "split05", "test") == [
        f"{root}/VideoFlash/1091_WSI_SAD_XX {root}/AudioWAV/1091_WSI_SAD_XX.wav 5"]
    assert written_rows(out, "split02", "test") == []
    assert len(written_rows(out, "split02", "train")) == 2


def test_an_absent_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}/AudioWAV: no such folder"):
        data.main(["crema-d", str(tmp_path), "--out", str(tmp_path / "folds")])
    (tmp_path / "AudioWAV").mkdir()
    with pytest.raises(SystemExit, match=f"{tmp_path}/faces: no such folder"):
        data.main(["crema-d", str(tmp_path), "--out", str(tmp_path / "folds"), "--videos", str(tmp_path / "faces")])


# ----------------------------------------------------------------------------------------------
# evaluate.py --summarize: against metrics counted by hand

# Two test sets of 6 videos and 3 classes: (target, class probabilities) per video.
FOLD_A = [(0, (0.6, 0.3, 0.1)), (0, (0.5, 0.4, 0.1)), (0, (0.2, 0.7, 0.1)),
          (1, (0.1, 0.8, 0.1)), (1, (0.3, 0.3, 0.4)), (2, (0.1, 0.2, 0.7))]
FOLD_B = [(0, (0.5, 0.3, 0.2)), (1, (0.6, 0.3, 0.1)), (1, (0.2, 0.5, 0.3)),
          (2, (0.1, 0.2, 0.7)), (2, (0.2, 0.6, 0.2)), (2, (0.2, 0.5, 0.3))]
# A predicts 0 0 1 | 1 2 | 2: recall 2/3, 1/2, 1; F1 = 2 TP / (support + predicted) = 4/5, 2/4, 2/3.
# AUC, pairs (positive above negative, ties 1/2) over pairs: class 0 8/9, class 1 5.5/8, class 2 5/5.
# B predicts 0 | 0 1 | 2 1 1: recall 1, 1/2, 1/3; F1 2/3, 2/5, 2/4; AUC 4/5, 4/8, 7/9.
EXPECTED = {
    "A": dict(uar=(2 / 3 + 1 / 2 + 1) / 3, war=4 / 6, weighted_f1=(3 * 4 / 5 + 2 * 1 / 2 + 1 * 2 / 3) / 6,
              macro_f1=(4 / 5 + 1 / 2 + 2 / 3) / 3, auc=(8 / 9 + 5.5 / 8 + 1) / 3),
    "B": dict(uar=(1 + 1 / 2 + 1 / 3) / 3, war=3 / 6, weighted_f1=(1 * 2 / 3 + 2 * 2 / 5 + 3 * 2 / 4) / 6,
              macro_f1=(2 / 3 + 2 / 5 + 2 / 4) / 3, auc=(4 / 5 + 4 / 8 + 7 / 9) / 3),
}
KEYS = ["uar", "war", "weighted_f1", "macro_f1", "auc"]


def write_classification(path, fold):
    lines = ["path,target,score_a,score_b,score_c"]
    lines += [f"v{i}.mp4,{t}," + ",".join(str(p) for p in probs) for i, (t, probs) in enumerate(fold)]
    path.write_text("\n".join(lines) + "\n")


def table_rows(text, kind):
    """{first cell: other cells} of the table of kind ("best" or "last") in the printed summary."""
    block = next(b for b in text.split("\n\n") if f"\n{kind} (predictions-{kind}.csv)" in "\n" + b)
    lines = block.split(f"{kind} (predictions-{kind}.csv)", 1)[1].splitlines()[1:]
    return {line.split()[0]: line.split()[1:] for line in lines}


def test_summary_of_folds_equals_hand_counted_metrics(tmp_path, capsys):
    # run1: best A, last B; run2: B and B; run3 (evaluate.py --checkpoint's folder): predictions.csv = A for both
    runs = [tmp_path / f"run{i}" for i in (1, 2, 3)]
    for run in runs:
        run.mkdir()
    write_classification(runs[0] / "predictions-best.csv", FOLD_A)
    write_classification(runs[0] / "predictions-last.csv", FOLD_B)
    write_classification(runs[1] / "predictions-best.csv", FOLD_B)
    write_classification(runs[1] / "predictions-last.csv", FOLD_B)
    write_classification(runs[2] / "predictions.csv", FOLD_A)
    out = tmp_path / "summary.json"
    assert evaluate.main(["--summarize"] + [str(r) for r in runs] + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    for kind, folds in (("best", "ABA"), ("last", "BBA")):
        got, rows = summary[kind], table_rows(printed, kind)
        assert list(got["folds"]) == [str(r) for r in runs]
        for run, fold in zip(runs, folds):
            assert got["folds"][str(run)] == pytest.approx(EXPECTED[fold], rel=1e-12)
            assert rows[str(run)] == [f"{100 * EXPECTED[fold][k]:.2f}%" for k in KEYS]
        for stat, fn in (("mean", statistics.mean), ("sd", statistics.stdev)):
            expected = {k: fn([EXPECTED[f][k] for f in folds]) for k in KEYS}
            assert got[stat] == pytest.approx(expected, rel=1e-9)
            assert rows[stat] == [f"{100 * expected[k]:.2f}%" for k in KEYS]


def test_one_fold_has_no_sd(tmp_path, capsys):
    write_classification(tmp_path / "predictions.csv", FOLD_B)
    out = tmp_path / "summary.json"
    evaluate.main(["--summarize", str(tmp_path), "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["best"]["sd"] == {k: None for k in KEYS}
    assert summary["best"]["mean"] == pytest.approx(EXPECTED["B"], rel=1e-12)
    assert table_rows(capsys.readouterr().out, "last")["sd"] == []


REG_TARGETS = np.array([[0.1, -0.5], [0.4, 0.2], [-0.3, 0.6], [0.8, -0.1], [0.0, 0.3]])
REG_PREDS = [np.array([[0.2, -0.3], [0.3, 0.1], [-0.1, 0.4], [0.5, 0.0], [0.1, 0.1]]),
             np.array([[0.0, 0.1], [0.6, -0.2], [-0.4, 0.5], [0.3, 0.2], [0.2, 0.4]])]


def write_regression(path, preds):
    lines = ["path,target_valence,target_arousal,pred_valence,pred_arousal"]
    lines += [f"v{i}.mp4," + ",".join(repr(float(v)) for v in list(t) + list(p))
              for i, (t, p) in enumerate(zip(REG_TARGETS, preds))]
    path.write_text("\n".join(lines) + "\n")


def pcc_ccc(p, t):
    """Population moments, as the paper's CCC (Lin's concordance) and Pearson's r."""
    cov = ((p - p.mean()) * (t - t.mean())).mean()
    return np.corrcoef(p, t)[0, 1], 2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


def test_summary_of_regression_folds(tmp_path, capsys):
    runs = [tmp_path / "r1", tmp_path / "r2"]
    per_run = []
    for run, preds in zip(runs, REG_PREDS):
        run.mkdir()
        write_regression(run / "predictions-best.csv", preds)
        write_regression(run / "predictions-last.csv", preds)
        pairs = [pcc_ccc(preds[:, d], REG_TARGETS[:, d]) for d in range(2)]
        per_run.append(dict(per_dim_pcc=[a for a, _ in pairs], per_dim_ccc=[b for _, b in pairs],
                            per_dim_mse=list(((preds - REG_TARGETS) ** 2).mean(0))))
    out = tmp_path / "summary.json"
    evaluate.main(["--summarize"] + [str(r) for r in runs] + ["--json", str(out)])
    summary, rows = json.loads(out.read_text())["best"], table_rows(capsys.readouterr().out, "best")
    for run, expected in zip(runs, per_run):
        got = summary["folds"][str(run)]
        for key in ("pcc", "ccc", "mse"):
            assert got[f"per_dim_{key}"] == pytest.approx(expected[f"per_dim_{key}"], rel=1e-12)
            assert got[key] == pytest.approx(np.mean(expected[f"per_dim_{key}"]), rel=1e-12)
        cells = [v for key in ("pcc", "ccc", "mse")
                 for v in expected[f"per_dim_{key}"] + [np.mean(expected[f"per_dim_{key}"])]]
        assert rows[str(run)] == [f"{v:.4f}" for v in cells]
    for d in range(2):
        values = [r["per_dim_ccc"][d] for r in per_run]
        assert summary["mean"]["per_dim_ccc"][d] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert summary["sd"]["per_dim_ccc"][d] == pytest.approx(statistics.stdev(values), rel=1e-9)
    means = [np.mean(r["per_dim_pcc"]) for r in per_run]
    assert summary["sd"]["pcc"] == pytest.approx(statistics.stdev(means), rel=1e-9)


def test_summary_errors_name_the_file(tmp_path):
    write_classification(tmp_path / "predictions-best.csv", FOLD_A)
    with pytest.raises(SystemExit, match=f"evaluate.py: {tmp_path}/predictions-last.csv: no such file"):
        evaluate.main(["--summarize", str(tmp_path)])
    other = tmp_path / "regression"
    other.mkdir()
    write_regression(other / "predictions.csv", REG_PREDS[0])
    write_classification(tmp_path / "predictions-last.csv", FOLD_B)
    with pytest.raises(SystemExit, match="different tasks"):
        evaluate.main(["--summarize", str(tmp_path), str(other)])


# ----------------------------------------------------------------------------------------------
# The recipe end to end: folds, a fine-tuning run per fold, the summary

TINY = ["--size", "tiny", "--img_size", "32", "--num_frames", "4", "--sampling_rate", "2", "--audio_frames", "32",
        "--mel_bins", "32", "--dim", "32", "--heads", "2", "--depth", "2", "--inter_layers", "1",
        "--fusion_depth", "1", "--num_workers", "0", "--device", "cpu", "--batch_size", "4", "--epochs", "1",
        "--warmup_epochs", "0", "--num_clips", "1", "--num_crops", "1", "--rand_ops", "0", "--mixup", "0",
        "--cutmix", "0", "--log_every", "1"]


def test_recipe_end_to_end(tmp_path):
    root = tmp_path / "CREMA-D"
    media = Media(root)
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for actor in (1001, 1019, 1037, 1055, 1073):  # one actor per fold
        for emotion in ("ANG", "HAP"):
            name = f"{actor}_DFA_{emotion}_XX"
            media.video(f"VideoFlash/{name}.mp4", 12)
            media.audio(f"AudioWAV/{name}.wav", 16000, media.tone(0.5, 16000, [0.5]))
    folds = tmp_path / "folds"
    assert data.main(["crema-d", str(root), "--out", str(folds)]) == 0
    runs = []
    for k in range(1, 6):
        split = folds / f"split0{k}"
        assert len(written_rows(folds, split.name, "test")) == 2
        runs.append(str(tmp_path / "runs" / split.name))
        finetune.main(TINY + ["--data_path", str(split / "train.csv"), "--test_path", str(split / "test.csv"),
                              "--output_dir", runs[-1]])
    out = tmp_path / "summary.json"
    assert evaluate.main(["--summarize", *runs, "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    for kind in ("best", "last"):
        assert list(summary[kind]["folds"]) == runs
        assert all(set(m) == set(KEYS) for m in summary[kind]["folds"].values())
        for stat in ("mean", "sd"):
            assert set(summary[kind][stat]) == set(KEYS)
            assert all(isinstance(v, float) and np.isfinite(v) for v in summary[kind][stat].values())
