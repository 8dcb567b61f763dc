"""Metrics, predictions files and the confusion image of evaluate.py. Expected values are worked out
by hand in the comments."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from evaluate import (classification_metrics, read_predictions, regression_metrics, roc_auc, save_confusion_png,
                      write_predictions)

ROOT = Path(__file__).resolve().parents[1]

# The hand-worked example: 3 classes, 8 samples.
TARGETS = [0, 0, 0, 0, 1, 1, 1, 2]
PREDS = [0, 0, 1, 2, 1, 1, 0, 2]


def read_image(path):
    """A PNG as uint8 (3, H, W)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def scores_predicting(preds, num_classes):
    """Scores of 0.8 for the predicted class and 0.1 elsewhere."""
    return 0.1 + 0.7 * torch.nn.functional.one_hot(torch.tensor(preds), num_classes).double()


def random_probabilities(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    return torch.randn(n, k, generator=g).softmax(1), targets


# ----------------------------------------------------------------------------------------------
# Classification

def test_hand_worked_example():
    m = classification_metrics(scores_predicting(PREDS, 3), TARGETS)
    # rows = true: class 0 -> predicted 0, 0, 1, 2; class 1 -> 1, 1, 0; class 2 -> 2
    assert m["confusion"] == [[2, 1, 1], [1, 2, 0], [0, 0, 1]]
    # recall = diagonal / row sums = 2/4, 2/3, 1/1
    assert m["per_class_recall"] == pytest.approx([1 / 2, 2 / 3, 1])
    assert m["uar"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # 13/18
    assert m["war"] == pytest.approx(5 / 8)  # 2 + 2 + 1 right out of 8
    # F1 = 2 TP / (row sum + column sum): class 0: 4 / (4 + 3) = 4/7; class 1: 4 / (3 + 3) = 2/3;
    # class 2: 2 / (1 + 2) = 2/3. Macro: (4/7 + 2/3 + 2/3) / 3 = 40/63; weighted by support 4, 3, 1:
    # (4 * 4/7 + 3 * 2/3 + 1 * 2/3) / 8 = 13/21.
    assert m["macro_f1"] == pytest.approx(40 / 63)
    assert m["weighted_f1"] == pytest.approx(13 / 21)
    # AUC of column c: positive-negative pairs won, ties counting 1/2.
    # class 0: positives score .8 .8 .1 .1, negatives .1 .1 .8 .1: 2 x (3 + .5) + 2 x 1.5 = 10 of 16
    # class 1: positives .8 .8 .1, negatives .1 .1 .8 .1 .1: 2 x (4 + .5) + 2 = 11 of 15
    # class 2: positive .8, negatives six .1 and one .8: 6.5 of 7
    assert m["auc"] == pytest.approx((10 / 16 + 11 / 15 + 6.5 / 7) / 3)


def test_absent_class_is_left_out_of_the_averages():
    # A 4th class with no sample and never predicted: recall NaN, F1 0/0 (set to 0, weight 0 and
    # not among the classes averaged), no AUC. Every average stays that of the 3-class example.
    scores = torch.cat([scores_predicting(PREDS, 3), torch.zeros(8, 1)], 1)
    m = classification_metrics(scores, TARGETS, num_classes=4)
    assert math.isnan(m["per_class_recall"][3])
    assert m["confusion"][3] == [0, 0, 0, 0] and [row[3] for row in m["confusion"]] == [0, 0, 0, 0]
    assert m["uar"] == pytest.approx(13 / 18)
    assert m["macro_f1"] == pytest.approx(40 / 63)
    assert m["weighted_f1"] == pytest.approx(13 / 21)
    assert m["auc"] == pytest.approx((10 / 16 + 11 / 15 + 6.5 / 7) / 3)


def test_predicted_only_class_counts_in_macro_f1_not_in_uar():
    # targets 0 0 1 1, predictions 0 2 1 1: class 2 has no sample but one prediction.
    m = classification_metrics(scores_predicting([0, 2, 1, 1], 3), [0, 0, 1, 1])
    assert m["uar"] == pytest.approx((1 / 2 + 1) / 2)  # recall 1/2 and 2/2; class 2 has none
    assert m["war"] == pytest.approx(3 / 4)
    # F1: class 0: 2 / (2 + 1) = 2/3; class 1: 4 / (2 + 2) = 1; class 2: 0 / (0 + 1) = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # 5/9
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 1) / 4)  # 5/6


def test_auc_with_a_tie():
    # positives 0.9 and 0.5, negatives 0.5 and 0.1: pairs 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1
    scores = torch.tensor([0.5, 0.1, 0.9, 0.5], dtype=torch.float64)
    positive = torch.tensor([False, False, True, True])
    assert roc_auc(scores, positive) == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # 0.875
    assert math.isnan(roc_auc(scores, torch.zeros(4, dtype=torch.bool)))


def test_macro_auc_one_vs_rest():
    scores = torch.tensor([[0.9, 0.05, 0.05, 0.0],
                           [0.5, 0.30, 0.20, 0.0],
                           [0.5, 0.25, 0.25, 0.0],
                           [0.1, 0.20, 0.70, 0.0]])
    targets = [0, 0, 1, 2]
    # class 0: positives .9 .5 vs negatives .5 .1: the tie example, 0.875
    # class 1: positive .25 vs negatives .05 .3 .2: beats two of three, 2/3
    # class 2: positive .7 vs negatives .05 .2 .25: 1
    # class 3 has no positive: left out
    assert classification_metrics(scores, targets)["auc"] == pytest.approx((7 / 8 + 2 / 3 + 1) / 3)  # 61/72


def test_perfect_predictions():
    targets = torch.tensor([2, 0, 1, 1, 0, 2, 3, 3])
    m = classification_metrics(torch.nn.functional.one_hot(targets, 4), targets)
    for key in ("uar", "war", "weighted_f1", "macro_f1", "auc"):
        assert m[key] == 1.0, key
    assert m["per_class_recall"] == [1.0] * 4
    assert m["confusion"] == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]


def test_constant_predictions():
    # every row the same: all predicted class 0, the majority (3 of 6)
    m = classification_metrics(torch.tensor([[0.5, 0.3, 0.2]]).expand(6, 3), [0, 0, 0, 1, 2, 2])
    assert m["war"] == pytest.approx(3 / 6)
    assert m["uar"] == pytest.approx(1 / 3)  # recalls 1, 0, 0
    assert m["auc"] == pytest.approx(0.5)  # every pair tied
    # F1 of class 0: 2 x 3 / (3 + 6) = 2/3; classes 1 and 2: 0
    assert m["macro_f1"] == pytest.approx(2 / 9)
    assert m["weighted_f1"] == pytest.approx(3 * 2 / 3 / 6)  # 1/3


def test_permuting_the_classes_changes_nothing():
    scores, targets = random_probabilities(60, 5, seed=0)
    m = classification_metrics(scores, targets)
    perm = torch.tensor([3, 0, 4, 1, 2])  # class c becomes perm[c]
    permuted = torch.empty_like(scores)
    permuted[:, perm] = scores
    p = classification_metrics(permuted, perm[targets])
    for key in ("uar", "war", "weighted_f1", "macro_f1", "auc"):
        assert p[key] == pytest.approx(m[key], abs=1e-12), key
    for c in range(5):
        assert p["per_class_recall"][perm[c]] == pytest.approx(m["per_class_recall"][c])
        for d in range(5):
            assert p["confusion"][perm[c]][perm[d]] == m["confusion"][c][d]
    assert 0.05 < m["war"] < 0.6  # random scores: the example is not a degenerate one


def test_bad_classification_input():
    with pytest.raises(ValueError, match="targets must lie"):
        classification_metrics(torch.rand(3, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="3 classes"):
        classification_metrics(torch.rand(3, 2), [0, 1, 1], num_classes=3)


# ----------------------------------------------------------------------------------------------
# Regression

T = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population variance (2.25 + .25 + .25 + 2.25) / 4 = 1.25


def test_regression_perfect_shifted_negated():
    m = regression_metrics(T, T)
    assert (m["pcc"], m["ccc"], m["mse"]) == (pytest.approx(1), pytest.approx(1), 0)
    # shifted by c = 1: CCC = 2 var / (2 var + c^2) = 1 / (1 + c^2 / (2 var)) = 1 / (1 + 1 / 2.5) = 5/7
    m = regression_metrics(T + 1, T)
    assert m["ccc"] == pytest.approx(5 / 7)
    assert m["pcc"] == pytest.approx(1)
    assert m["mse"] == pytest.approx(1)
    # negated: cov = -1.25, means -2.5 and 2.5: CCC = -2.5 / (1.25 + 1.25 + 25) = -1/11
    m = regression_metrics(-T, T)
    assert m["pcc"] == pytest.approx(-1)
    assert m["ccc"] == pytest.approx(-1 / 11)
    assert m["mse"] == pytest.approx((4 + 16 + 36 + 64) / 4)  # (2t)^2


def test_regression_hand_values():
    # preds 2 2 4 4: errors 1 0 1 0, MSE 1/2. Deviations -1 -1 1 1 and -1.5 -.5 .5 1.5:
    # cov = (1.5 + .5 + .5 + 1.5) / 4 = 1, var_p = 1, var_t = 1.25, means 3 and 2.5
    m = regression_metrics([2.0, 2.0, 4.0, 4.0], T)
    assert m["mse"] == pytest.approx(0.5)
    assert m["pcc"] == pytest.approx(1 / math.sqrt(1.25))
    assert m["ccc"] == pytest.approx(2 / (1 + 1.25 + 0.25))  # 0.8


def test_constant_predictions_have_no_correlation():
    m = regression_metrics(torch.full((4,), 0.1), T)
    assert math.isnan(m["pcc"])
    assert m["ccc"] == pytest.approx(0, abs=1e-12)  # no covariance
    assert m["mse"] == pytest.approx((0.81 + 3.61 + 8.41 + 15.21) / 4)  # 0.9^2, 1.9^2, 2.9^2, 3.9^2
    # (0.1 + 0.1 + 0.1) / 3 is not exactly 0.1 in floating point: deviations of 1e-17 must not
    # turn into a correlation
    assert math.isnan(regression_metrics(torch.full((3,), 0.1, dtype=torch.float64), [1.0, 2.0, 3.0])["pcc"])


def test_regression_dimensions_and_means():
    preds = torch.stack([T, T + 1], 1)
    m = regression_metrics(preds, torch.stack([T, T], 1), names=["arousal", "valence"])
    assert m["names"] == ["arousal", "valence"]
    assert m["per_dim_ccc"] == pytest.approx([1, 5 / 7])
    assert m["ccc"] == pytest.approx(6 / 7)
    assert m["per_dim_mse"] == pytest.approx([0, 1])
    assert m["mse"] == pytest.approx(0.5)
    with_constant = regression_metrics(torch.stack([T, torch.ones(4)], 1), torch.stack([T, T], 1))
    assert with_constant["per_dim_pcc"][0] == pytest.approx(1)
    assert math.isnan(with_constant["pcc"])  # the mean over dimensions keeps the NaN


# ----------------------------------------------------------------------------------------------
# Predictions files and the command line

def classification_file(tmp_path):
    scores, targets = random_probabilities(40, 4, seed=1)
    paths = [f"videos/clip {i}, take \"{i % 3}\".mp4" for i in range(40)]  # commas and quotes survive
    names = ["neutral", "happy", "sad, very", "angry"]
    path = tmp_path / "predictions.csv"
    write_predictions(path, paths, targets, scores, "classification", names)
    return path, paths, targets, scores, names


def regression_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    targets, preds = torch.rand(30, 3, generator=g), torch.rand(30, 3, generator=g)
    paths = [f"v{i}" for i in range(30)]
    names = ["arousal", "valence", "dominance"]
    path = tmp_path / "regression.csv"
    write_predictions(path, paths, targets, preds, "regression", names)
    return path, paths, targets, preds, names


def test_classification_file_round_trip(tmp_path):
    path, paths, targets, scores, names = classification_file(tmp_path)
    assert path.read_text().splitlines()[0] == 'path,target,score_neutral,score_happy,"score_sad, very",score_angry'
    read_paths, read_targets, read_scores, task, read_names = read_predictions(path)
    assert (read_paths, task, read_names) == (paths, "classification", names)
    assert torch.equal(read_targets, targets)
    assert torch.equal(read_scores, scores.double())  # float32 scores come back bit for bit
    assert repr(classification_metrics(read_scores, read_targets)) == repr(classification_metrics(scores, targets))


def test_regression_file_round_trip(tmp_path):
    path, paths, targets, preds, names = regression_file(tmp_path)
    assert path.read_text().splitlines()[0] == ("path,target_arousal,target_valence,target_dominance,"
                                                "pred_arousal,pred_valence,pred_dominance")
    read_paths, read_targets, read_preds, task, read_names = read_predictions(path)
    assert (read_paths, task, read_names) == (paths, "regression", names)
    assert torch.equal(read_targets, targets.double()) and torch.equal(read_preds, preds.double())
    assert (repr(regression_metrics(read_preds, read_targets, read_names))
            == repr(regression_metrics(preds, targets, names)))


def test_not_a_predictions_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a.mp4 a.wav 3\n")
    with pytest.raises(ValueError, match="not a predictions file"):
        read_predictions(path)


def test_a_missing_predictions_file_is_named_in_one_line(tmp_path):
    missing = tmp_path / "predictions-best.csv"
    with pytest.raises(SystemExit, match=rf"^evaluate.py: {missing}: No such file or directory$"):
        evaluate.main(["--predictions", str(missing)])


def run_cli(*args):
    result = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_prints_the_classification_metrics(tmp_path):
    path, _, targets, scores, names = classification_file(tmp_path)
    m = classification_metrics(scores, targets)
    out = run_cli("--predictions", path, "--output_dir", tmp_path / "out")
    printed = dict(re.findall(r"^(UAR|WAR|weighted F1|macro F1|AUC) +(\S+)%$", out, re.M))
    labels = {"UAR": "uar", "WAR": "war", "weighted F1": "weighted_f1", "macro F1": "macro_f1", "AUC": "auc"}
    assert printed.keys() == labels.keys()
    for label, key in labels.items():
        assert float(printed[label]) == pytest.approx(100 * m[key], abs=0.005), label
    recall_line = next(line for line in out.splitlines() if line.startswith("per-class recall"))
    assert [float(v) for v in re.findall(r"(\S+)%", recall_line)] == pytest.approx(
        [100 * r for r in m["per_class_recall"]], abs=0.005)
    *table, written = out.split("columns: predicted)\n")[1].splitlines()
    assert [[int(n) for n in row.split()[-4:]] for row in table[1:]] == m["confusion"]
    assert written == f"wrote {tmp_path / 'out' / 'confusion.png'}: the confusion matrix"
    assert read_image(tmp_path / "out" / "confusion.png").shape[0] == 3


def test_cli_prints_the_regression_metrics(tmp_path):
    path, _, targets, preds, names = regression_file(tmp_path)
    m = regression_metrics(preds, targets, names)
    lines = {line.split()[0]: line.split()[1:] for line in run_cli("--predictions", path).splitlines()[1:]}
    assert lines.pop("arousal") == ["valence", "dominance", "mean"]  # the header row of the table
    for key in ("pcc", "ccc", "mse"):
        values = [float(v) for v in lines[key.upper()]]
        assert values == pytest.approx(m[f"per_dim_{key}"] + [m[key]], abs=5e-5), key


# ----------------------------------------------------------------------------------------------
# The confusion image

def test_confusion_png(tmp_path):
    path = tmp_path / "confusion.png"
    save_confusion_png([[3, 1, 0], [0, 0, 0], [0, 2, 2]], path, ["neutral", "happy", "a name far too long to fit"])
    image = read_image(path)  # (3, H, W) uint8
    side = evaluate.TITLE_PX + evaluate.LABEL_PX + 3 * evaluate.CELL_PX + evaluate.MARGIN_PX
    assert image.shape == (3, side, side)
    origin, cell = evaluate.TITLE_PX + evaluate.LABEL_PX, evaluate.CELL_PX

    def corner(i, j):  # a pixel inside cell (i, j), clear of the text
        return image[:, origin + i * cell + 4, origin + j * cell + 4].tolist()

    # row 0 shares 3/4, 1/4, 0: colour 255 + share x (full - 255), per channel; full = (8, 48, 107)
    assert corner(0, 0) == pytest.approx([255 - 0.75 * 247, 255 - 0.75 * 207, 255 - 0.75 * 148], abs=1)
    assert corner(0, 2) == [255, 255, 255]
    assert corner(1, 1) == [255, 255, 255]  # a class without samples stays white
    assert corner(2, 1) == pytest.approx([255 - 0.5 * 247, 255 - 0.5 * 207, 255 - 0.5 * 148], abs=1)
    # the text of cell (0, 0) is white on blue: bright pixels in its middle
    middle = image[:, origin + cell // 4:origin + 3 * cell // 4, origin + cell // 4:origin + 3 * cell // 4]
    assert (middle.min(0).values > 230).sum() > 20
    # class names: dark pixels left of each row and above each column
    for c in range(3):
        band = slice(origin + c * cell, origin + (c + 1) * cell)
        assert (image[:, band, evaluate.TITLE_PX:origin].max(0).values < 100).sum() > 20
        assert (image[:, evaluate.TITLE_PX:origin, band].max(0).values < 100).sum() > 20


def test_predictions_alone_draw_a_titled_confusion_matrix_beside_the_file(tmp_path, capsys):
    path, *_ = classification_file(tmp_path)
    evaluate.main(["--predictions", str(path)])
    png = tmp_path / "predictions-confusion.png"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {png}: the confusion matrix"
    image = read_image(png)
    assert image.shape[1] == image.shape[2] + evaluate.TITLE_PX  # the title band above the square matrix
    assert (image[:, :evaluate.TITLE_PX].max(0).values < 100).sum() > 50  # the title is drawn there


def test_confusion_png_has_no_blank_band_above_short_names(tmp_path):
    path = tmp_path / "confusion.png"
    save_confusion_png([[3, 1], [0, 4]], path, ["a", "b"])
    image = read_image(path)
    blank = (image.min(0).values == 255).all(1).tolist()  # rows of white pixels only
    longest = max(len(run) for run in "".join("x" if b else " " for b in blank).split())
    assert longest < evaluate.TITLE_PX  # at most a margin, no band left for names that are not there
