"""Evaluation for HiCMAE: metrics, predictions files, multi-view testing, single-video inference and
frozen-feature probes (the README tells more).

  python evaluate.py --checkpoint C --data_path TEST        test a fine-tuned checkpoint (ours or the authors')
                                                            on a manifest: metrics, predictions.csv, confusion.png
  python evaluate.py --predictions FILE.csv                 every metric of a predictions file, and its confusion.png
  python evaluate.py --checkpoint C --video FILE_OR_FOLDER ... [--face_crop auto|on|off]
                                                            recordings of any length window by window: a timeline
                                                            (CSV, PNG) each, faces aligned as the training crops
  python evaluate.py --probe --checkpoint C [--data_path TRAIN --test_path TEST] [--json OUT.json]
                                                            frozen features of any checkpoint against random
                                                            initialisation and no model (default: the demo data)
  python evaluate.py --summarize RUN_DIR ... [--json OUT.json]
                                                            every fold's metrics, their mean and sample sd
Add --features OUT.npy to a checkpoint form to save the features the head sees, one row per video (per window).
"""

import argparse
import csv
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
from model import (FEATURE_PARTS, HiCMAE, HiCMAEClassifier, checkpoint_config, load_checkpoint, load_weights,
                   model_state, reconstruction_targets)
from pretrain import HelpFormatter, add_device_args, autocast, demo_manifests, setup, to_device

# ----------------------------------------------------------------------------------------------
# 1. Metrics

CLASSIFICATION_KEYS = ("uar", "war", "weighted_f1", "macro_f1", "auc")
CLASSIFICATION_LABELS = {"uar": "UAR", "war": "WAR", "weighted_f1": "weighted F1", "macro_f1": "macro F1",
                         "auc": "AUC"}
REGRESSION_KEYS = ("pcc", "ccc", "mse")


def _float64(x):
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


def _names(names, count):
    """count names as strings; by default "0", "1", ..."""
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} columns")
    return names


def confusion_matrix(targets, predictions, num_classes):
    """(K, K) int64 counts: rows are the true classes, columns the predicted ones."""
    cells = targets * num_classes + predictions
    return torch.bincount(cells, minlength=num_classes * num_classes).view(num_classes, num_classes)


def average_ranks(values):
    """1-based ranks of a 1-D tensor; tied values share the mean of their ranks."""
    _, group, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # the rank of the last member of each group of ties
    return (last - (counts - 1) / 2)[group]


def roc_auc(scores, positive):
    """ROC AUC of scores (N,) for the boolean labels positive (N,), NaN without both kinds: the Mann-Whitney
    U statistic over n_pos * n_neg (a random positive scores above a random negative, ties count one half)."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = average_ranks(scores)[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _check_classification(scores, targets, num_classes):
    if scores.ndim != 2 or targets.shape != scores.shape[:1] or len(targets) == 0:
        raise ValueError(f"expected scores (N, K) and targets (N,) with N > 0, got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    if num_classes is not None and num_classes != scores.shape[1]:
        raise ValueError(f"{num_classes} classes, but the scores have {scores.shape[1]} columns")
    low, high = targets.min().item(), targets.max().item()
    if low < 0 or high >= scores.shape[1]:
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}), got {low}..{high}")


def classification_metrics(scores, targets, num_classes=None):
    """UAR, WAR, weighted and macro F1, macro AUC, per-class recall and the confusion matrix, as fractions.
    scores (N, K): probabilities (AUC ranks each column; the prediction is the first arg max); targets (N,)."""
    scores = _float64(scores)
    targets = torch.as_tensor(targets).to("cpu", torch.long)
    _check_classification(scores, targets, num_classes)
    k = scores.shape[1]
    confusion = confusion_matrix(targets, scores.argmax(1), k)
    counts = confusion.to(torch.float64)
    hits, support, predicted = counts.diag(), counts.sum(1), counts.sum(0)

    recall = hits / support  # NaN for a class without samples: UAR averages the classes present
    # F1 = 2 TP / (support + predicted), 0 for a class never true nor predicted (scikit-learn's zero_division=0);
    # macro F1 averages the classes seen in targets or predictions, as the authors' f1_score call.
    seen = support + predicted
    f1 = torch.where(seen > 0, 2 * hits / seen.clamp(min=1), 0.0)
    auc = torch.tensor([roc_auc(scores[:, c], targets == c) for c in range(k)], dtype=torch.float64)
    return {
        "uar": recall.nanmean().item(),
        "war": (hits.sum() / len(targets)).item(),
        "weighted_f1": ((f1 * support).sum() / support.sum()).item(),
        "macro_f1": f1[seen > 0].mean().item(),
        "auc": auc.nanmean().item(),  # one-vs-rest, over the classes with positives and negatives
        "per_class_recall": recall.tolist(),
        "confusion": confusion.tolist(),
    }


def regression_metrics(preds, targets, names=None):
    """PCC, CCC and MSE per dimension of preds, targets (N, D) or (N,), and their means. Population moments
    (the authors divide CCC's (co)variances by N - 1, a difference of order 1 / N); PCC is NaN for a constant."""
    preds, targets = _float64(preds), _float64(targets)
    if preds.ndim == 1:
        preds, targets = preds[:, None], targets.reshape(-1, 1)
    if preds.ndim != 2 or preds.shape != targets.shape or len(preds) == 0:
        raise ValueError(f"expected preds and targets of the same shape (N, D), N > 0, got "
                         f"{tuple(preds.shape)} and {tuple(targets.shape)}")
    names = _names(names, preds.shape[1])

    mean_p, mean_t = preds.mean(0), targets.mean(0)
    dev_p, dev_t = preds - mean_p, targets - mean_t
    var_p, var_t, cov = (dev_p ** 2).mean(0), (dev_t ** 2).mean(0), (dev_p * dev_t).mean(0)
    # A constant column's mean is not always exact in floating point, so test constancy directly.
    constant = (preds == preds[0]).all(0) | (targets == targets[0]).all(0)
    pcc = torch.where(constant, math.nan, cov / (var_p * var_t).sqrt())
    ccc = 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2)
    mse = ((preds - targets) ** 2).mean(0)
    metrics = {"names": names}
    for key, per_dim in zip(REGRESSION_KEYS, (pcc, ccc, mse)):
        metrics[key] = per_dim.mean().item()
        metrics[f"per_dim_{key}"] = per_dim.tolist()
    return metrics


def metric_text(value, task="classification"):
    """A metric as printed: classification in percent with 2 decimals, regression with 4."""
    return f"{100 * value:.2f}%" if task == "classification" else f"{value:.4f}"


def _table(rows):
    """Rows of cells as text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
            for row in rows]


def format_metrics(metrics, class_names=None):
    """A table of classification_metrics (percent, 2 decimals) or regression_metrics (4 decimals)."""
    if "uar" not in metrics:
        names = metrics["names"]
        rows = [[""] + names + ["mean"]]
        rows += [[key.upper()] + [metric_text(v, "regression") for v in metrics[f"per_dim_{key}"] + [metrics[key]]]
                 for key in REGRESSION_KEYS]
        return "\n".join(_table(rows))

    names = _names(class_names, len(metrics["confusion"]))
    lines = _table([[CLASSIFICATION_LABELS[key], metric_text(metrics[key])] for key in CLASSIFICATION_KEYS])
    recalls = (f"{name} {metric_text(r)}" for name, r in zip(names, metrics["per_class_recall"]))
    lines.append("per-class recall  " + "  ".join(recalls))
    lines.append("confusion (rows: true, columns: predicted)")
    rows = [[""] + names] + [[name] + [str(n) for n in counts] for name, counts in zip(names, metrics["confusion"])]
    lines += ["  " + line for line in _table(rows)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 2. Predictions files: a CSV row per video, "path, target, score_<class> ..." (class probabilities) or
# "path, target_<name> ..., pred_<name> ...". Numbers in repr, so that they read back to the same floats.

def write_predictions(path, paths, targets, scores, task, class_names=None):
    """The predictions file of N videos: targets (N,) and scores (N, K), or for regression (N, D) each;
    class_names name the K classes or D dimensions (default the indices)."""
    scores = _float64(scores)
    if task == "classification":
        target_cells = [[str(t)] for t in torch.as_tensor(targets).long().tolist()]
        columns = ["target"] + [f"score_{n}" for n in _names(class_names, scores.shape[1])]
    elif task == "regression":
        scores, targets = scores.reshape(len(scores), -1), _float64(targets).reshape(len(scores), -1)
        target_cells = [[repr(v) for v in row] for row in targets.tolist()]
        names = _names(class_names, scores.shape[1])
        columns = [f"target_{n}" for n in names] + [f"pred_{n}" for n in names]
    else:
        raise ValueError(f"task is 'classification' or 'regression', got {task!r}")
    if not len(paths) == len(target_cells) == len(scores):
        raise ValueError(f"{len(paths)} paths, {len(target_cells)} targets and {len(scores)} scores")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"] + columns)
        writer.writerows([video] + cells + [repr(v) for v in row]
                         for video, cells, row in zip(paths, target_cells, scores.tolist()))


def read_predictions(path):
    """(paths, targets, scores, task, names) of a predictions file, the task and the names from its header."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    task, names, target_columns, score_columns = _prediction_columns(reader.fieldnames or [], path)
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # where DictReader puts cells beyond the header, or missing ones
            raise ValueError(f"{path}:{line}: not one cell per column of the header")
    try:
        targets = torch.tensor([[float(row[c]) for c in target_columns] for row in rows], dtype=torch.float64)
        scores = torch.tensor([[float(row[c]) for c in score_columns] for row in rows], dtype=torch.float64)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    targets = targets.reshape(len(rows), len(target_columns))
    if task == "classification":
        targets = targets[:, 0].long()
    return [row["path"] for row in rows], targets, scores.reshape(len(rows), len(names)), task, names


def _prediction_columns(header, path):
    """(task, names, target columns, score columns) of a predictions file's header, or ValueError."""
    task = "classification" if header[1:2] == ["target"] else "regression"
    prefix = "score_" if task == "classification" else "pred_"
    names = [c[len(prefix):] for c in header if c.startswith(prefix)]
    target_columns = ["target"] if task == "classification" else [f"target_{n}" for n in names]
    score_columns = [prefix + n for n in names]
    if not names or header != ["path"] + target_columns + score_columns:
        raise ValueError(f"{path}: not a predictions file (header {header})")
    return task, names, target_columns, score_columns


# ----------------------------------------------------------------------------------------------
# 3. The confusion matrix as a PNG

CELL_PX = 64  # side of one cell
LABEL_PX = 120  # room for the class names left of and above the matrix
TITLE_PX = 24  # room for the axis titles
MARGIN_PX = 8  # right and bottom
FULL_COLOUR = (8, 48, 107)  # a row share of 100%; 0% is white


def _fit(text, font, width):
    """text, cut short with an ellipsis to fit width pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _rotated_text(image, text, font, box, centred=False):
    """Draw text reading bottom to top in box (left, top, right, bottom): from its bottom, or centred."""
    left, top, right, bottom = box
    mask = Image.new("L", (bottom - top, right - left))
    at = ((bottom - top) // 2 if centred else 0, (right - left) // 2)
    ImageDraw.Draw(mask).text(at, text, font=font, fill=255, anchor="mm" if centred else "lm")
    image.paste("black", box, mask.rotate(90, expand=True))


def save_confusion_png(confusion, path, class_names=None, title=None):
    """A heat map of the confusion matrix, each cell its row share and count, on a square of side TITLE_PX +
    room of the longest name (at most LABEL_PX) + K * CELL_PX + MARGIN_PX; a title adds TITLE_PX above."""
    counts = torch.as_tensor(confusion, dtype=torch.float64)
    k = len(counts)
    if counts.shape != (k, k):
        raise ValueError(f"a confusion matrix is square, got {tuple(counts.shape)}")
    support = counts.sum(1, keepdim=True)
    shares = counts / support.clamp(min=1)  # a class without samples stays white and shows "–"
    names = _names(class_names, k)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    label_px = min(LABEL_PX, 12 + math.ceil(max(font.getlength(name) for name in names)))
    origin = TITLE_PX + label_px  # the matrix's top-left corner, in x and in y
    side = origin + k * CELL_PX + MARGIN_PX
    matrix = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(matrix)

    for i in range(k):
        for j in range(k):
            share = shares[i, j].item()
            x, y = origin + j * CELL_PX, origin + i * CELL_PX
            colour = tuple(round(255 + share * (c - 255)) for c in FULL_COLOUR)
            draw.rectangle((x, y, x + CELL_PX - 1, y + CELL_PX - 1), fill=colour, outline=(190, 190, 190))
            ink = "white" if share > 0.5 else "black"
            centre = x + CELL_PX // 2
            percent = f"{100 * share:.0f}%" if support[i] > 0 else "–"
            draw.text((centre, y + CELL_PX // 2 - 7), percent, font=font, fill=ink, anchor="mm")
            draw.text((centre, y + CELL_PX // 2 + 11), f"{int(counts[i, j])}", font=small, fill=ink, anchor="mm")

    for c, name in enumerate(names):
        name = _fit(name, font, label_px - 12)
        middle = origin + c * CELL_PX + CELL_PX // 2
        draw.text((origin - 6, middle), name, font=font, fill="black", anchor="rm")
        _rotated_text(matrix, name, font, (middle - CELL_PX // 2, TITLE_PX, middle + CELL_PX // 2, origin - 6))
    draw.text((origin + k * CELL_PX // 2, TITLE_PX // 2), "predicted", font=font, fill="black", anchor="mm")
    _rotated_text(matrix, "true", font, (0, origin, TITLE_PX, origin + k * CELL_PX), centred=True)
    image = matrix
    if title:
        image = Image.new("RGB", (side, side + TITLE_PX), "white")
        image.paste(matrix, (0, TITLE_PX))
        ImageDraw.Draw(image).text((side // 2, TITLE_PX // 2), _fit(title, font, side - 8), font=font, fill="black",
                                   anchor="mm")
    image.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------
# 4. Multi-view testing and fine-tuned checkpoints

def compute_metrics(scores, targets, task, names=None):
    if task == "classification":
        return classification_metrics(scores, targets)
    return regression_metrics(scores, targets, names)


@torch.no_grad()
def predict(model, loader, task, device, amp=nullcontext, features=False):
    """(indices, scores, features or None) of every item, in index order: the class probabilities (or the
    outputs) and features the head sees, averaged over the item's views. Distributed: every rank gets all,
    without DistributedSampler's repeats."""
    was_training = model.training
    model.eval()
    indices, scores, feats = [], [], []
    for batch in loader:
        score, feature = view_means(model, batch["video"], batch["audio"], task, device, amp)
        scores.append(score)
        if features:
            feats.append(feature)
        indices.append(torch.as_tensor(batch["index"]))
    model.train(was_training)
    result = [torch.cat(indices), torch.cat(scores), torch.cat(feats) if features else None]
    if dist.is_available() and dist.is_initialized():
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, result)
        result = [None if r is None else torch.cat([share[i] for share in shares]) for i, r in enumerate(result)]
    index, order = result[0].sort(stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]  # the first copy of each index
    order = order[first]
    return tuple(None if r is None else r[order] for r in result)


@torch.no_grad()
def view_means(model, video, audio, task, device, amp=nullcontext):
    """(scores, features) of items given as views (B, V, ...): the class probabilities (or the outputs) and the
    features the head sees, each averaged over an item's views, float32 on the CPU."""
    views = video.shape[1]
    with amp():
        feature = model.forward_features(video.to(device).flatten(0, 1), audio.to(device).flatten(0, 1))
        out = model.head(feature).float()
    return mean_over_views(out.softmax(-1) if task == "classification" else out, views), mean_over_views(feature, views)


def mean_over_views(x, views):
    """Values per view (B x V, ...) -> per item (B, ...): the mean over each item's V views, float32 on the CPU."""
    return x.float().view(-1, views, *x.shape[1:]).mean(1).cpu()


def test_pass(model, loader, task, device, amp=nullcontext, features=False):
    """The multi-view test of every sample of a test loader's data set (predict): (the samples in order, their
    targets, scores, features or None). finetune.py tests after each epoch with it, evaluate.py a checkpoint."""
    indices, scores, feats = predict(model, loader, task, device, amp, features)
    samples = [loader.dataset.samples[i] for i in indices.tolist()]
    return samples, torch.tensor([s.target for s in samples]), scores, feats


def test_loader(samples, cfg, sampling_rate, args, modality="av"):
    """The test views of samples (--num_clips x --num_crops, --test_views), batched; one recording is read
    in this process, so that its error reads as the DataError it is."""
    dataset = data.FinetuneDataset(samples, cfg, train=False, sampling_rate=sampling_rate, num_clips=args.num_clips,
                                   num_crops=args.num_crops, test_views=args.test_views or "authors", modality=modality)
    workers = args.num_workers if len(samples) > 1 else 0
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)


def load_finetuned(path, device="cpu", num_outputs=None, log=print, **overrides):
    """(model in eval mode, run) rebuilt from a checkpoint alone, ours or the authors': a fine-tuned one with its
    head, or any with a fresh head of num_outputs; run says how to test it (model.checkpoint_config), overrides
    (e.g. heads=4) what the file cannot; log gets load_weights' notes."""
    checkpoint = load_checkpoint(path)
    try:
        cfg, run = checkpoint_config(checkpoint, **overrides)
        if run["num_outputs"] is None and num_outputs is None:
            whose = "the authors'" if run["authors"] else "a"
            raise ValueError(f"{whose} pre-training checkpoint has no head: fine-tune it (finetune.py --init), or "
                             "probe its encoders (evaluate.py --probe)")
        model = HiCMAEClassifier(cfg, run["modality"], num_outputs or run["num_outputs"])
        load_weights(model, model_state(checkpoint), log)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    return model.to(device).eval(), run


# ----------------------------------------------------------------------------------------------
# 5. Faces aligned as OpenFace 2.2 aligns them (the authors' crops), from dlib's 68 landmarks: for recordings
# here, and for tools/face_crop.py, which writes them to disk. dlib and its landmark model come from the
# optional requirements-faces.txt (its training data, iBUG 300-W, is for non-commercial use only).

MEAN_SHAPE = np.loadtxt(Path(__file__).parent / "tools" / "openface_mean_shape_68.txt")[:, :2]  # (68, 2) mm, y down
# OpenFace's rigid points (Face_utils.cpp, extract_rigid_points): cheeks, nose bridge and base, eye corners.
RIGID = [1, 2, 3, 4, 12, 13, 14, 15, 27, 28, 29, 31, 32, 33, 34, 35, 36, 39, 40, 41, 42, 45, 46, 47]
TRACK_SIZE, TRACK_SCALE = 200, 1.0  # the upright view the face is looked for in, and its pixels per mm
FACE_SIZE = 256  # pixels of an aligned face, as the authors' crops (OpenFace's -simsize 256)
FACES_MISSING = ("aligning faces needs dlib and its 68-point landmark model: pip install -r requirements-faces.txt")
_FACE_MODELS = None  # loaded once per process


def load_face_models():
    """dlib's HOG face detector and 68-point shape predictor; ImportError if the extra is not installed."""
    global _FACE_MODELS
    if _FACE_MODELS is None:
        import dlib
        import face_recognition_models
        _FACE_MODELS = dlib.get_frontal_face_detector(), dlib.shape_predictor(
            face_recognition_models.pose_predictor_model_location())
    return _FACE_MODELS


def similarity(src, dst):
    """The 2 x 2 matrix A (scale times rotation) of OpenFace's AlignShapesWithScale: both point sets centred,
    the scale the ratio of their RMS radii, the rotation Kabsch's (no reflection); dst - mean ~ A (src - mean)."""
    src, dst = src - src.mean(0), dst - dst.mean(0)
    scale = np.sqrt((dst ** 2).sum() / (src ** 2).sum())
    u, _, vt = np.linalg.svd(src.T @ dst)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    return scale * (vt.T @ np.diag([1.0, d]) @ u.T)


def alignment(landmarks, scale, size):
    """(A, b): the affine map x -> A x + b from frame pixels to the size x size aligned face, whose rigid points
    match MEAN_SHAPE * scale (pixels per mm) and whose centre (the mean of the 68 landmarks, where OpenFace puts
    the origin of its fitted 3D shape) is the middle pixel (size // 2, as OpenFace)."""
    a = similarity(landmarks[RIGID], MEAN_SHAPE[RIGID] * scale)
    return a, size // 2 - a @ landmarks.mean(0)


def warp(image, a, b, size):
    """The size x size image out(x) = image(A^-1 (x - b)), bilinear, black outside: OpenCV's warpAffine with
    pixel centres at integers, written for Pillow, whose pixel centres are at +0.5."""
    inv = np.linalg.inv(a)
    offset = 0.5 - inv @ (b + 0.5)
    return image.transform((size, size), Image.Transform.AFFINE, (*inv[0], offset[0], *inv[1], offset[1]),
                           Image.Resampling.BILINEAR)


def aligned_face(image, landmarks, size=FACE_SIZE):
    """The aligned face of a PIL image: OpenFace's -simalign -simsize SIZE (0.7 / 112 of SIZE per mm), no mask."""
    return warp(image, *alignment(landmarks, size * 0.7 / 112, size), size)


def _centre(rect):
    return np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])


class FaceFollower:
    """The 68 landmarks of one face through a sequence of frames; None where it is not found. One face: the
    largest in the first frame where one is found, then followed: each frame is turned upright and scaled by
    the previous landmarks and the detector looks there, else in the whole frame near where it was."""

    def __init__(self, models):
        self.detector, self.predictor = models
        self.previous = None  # the last frame's landmarks

    def _shape(self, gray, box):
        parts = self.predictor(gray, box).parts()
        return np.array([(p.x, p.y) for p in parts], dtype=np.float64)

    def _in_frame(self, gray):
        """Landmarks of the largest face in the whole frame (the one nearest the previous face when following)."""
        boxes = self.detector(gray, 0) or self.detector(gray, 1)  # faces of 80 pixels and up, then 40
        if not boxes:
            return None
        if self.previous is None:
            return self._shape(gray, max(boxes, key=lambda r: r.area()))
        centre = self.previous.mean(0)
        reach = np.ptp(self.previous, axis=0).max()  # not a new person elsewhere in the frame
        box = min(boxes, key=lambda r: np.hypot(*(_centre(r) - centre)))
        return self._shape(gray, box) if np.hypot(*(_centre(box) - centre)) <= reach else None

    def _near_previous(self, image):
        """Landmarks from the upright view of the previous face; None if the detector finds no face there."""
        a, b = alignment(self.previous, TRACK_SCALE, TRACK_SIZE)
        view = np.asarray(warp(image, a, b, TRACK_SIZE))
        boxes = self.detector(view, 0)
        if not boxes:
            return None
        box = min(boxes, key=lambda r: np.hypot(*(_centre(r) - TRACK_SIZE / 2)))
        return (self._shape(view, box) - b) @ np.linalg.inv(a).T

    def __call__(self, gray_image):
        """Landmarks (68, 2) in frame pixels of the face in this frame (a grayscale PIL image), or None."""
        landmarks = self._near_previous(gray_image) if self.previous is not None else None
        if landmarks is None:
            landmarks = self._in_frame(np.asarray(gray_image))
        if landmarks is not None:
            self.previous = landmarks
        return landmarks


def nearest_landmarks(found):
    """A list of landmarks or None, each None replaced by the landmarks of the nearest frame that has them
    (the earlier one on a tie): how a frame where the face is not found is aligned. All None: unchanged."""
    have = np.array([i for i, landmarks in enumerate(found) if landmarks is not None])
    if not len(have):
        return list(found)
    return [found[i] if found[i] is not None else found[have[np.abs(have - i).argmin()]] for i in range(len(found))]


class FaceAligner:
    """Aligned faces (FACE_SIZE) of the frames of a recording's windows. Each frame's landmarks are found
    once, in time order (windows overlap: a frame is seen again); within a window a frame without a face takes
    the landmarks of the window's nearest frame with one."""

    def __init__(self):
        self.follow = FaceFollower(load_face_models())
        self.found = {}  # landmarks (or None) by tick, of the frames of the windows still to come

    def __call__(self, frames, ticks):
        """(aligned uint8 (T, 3, S, S), share of the frames with a face) of frames (H, W, 3) at ticks; (None, 0.0)
        for a window without a face."""
        for tick in [t for t in self.found if t < ticks[0]]:
            del self.found[tick]
        for tick, frame in zip(ticks, frames):
            if tick not in self.found:
                self.found[tick] = self.follow(Image.fromarray(frame).convert("L"))
        found = [self.found[tick] for tick in ticks]
        share = sum(landmarks is not None for landmarks in found) / len(found)
        if not share:
            return None, 0.0
        faces = [np.asarray(aligned_face(Image.fromarray(frame), landmarks))
                 for frame, landmarks in zip(frames, nearest_landmarks(found))]
        return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2), share


# ----------------------------------------------------------------------------------------------
# 6. Recordings of any length (--video): the model window by window, and the timeline of its answers

FACE_CROP = ("auto", "on", "off")
TIMELINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # matplotlib's tab10
NOT_FACES = "frames that are face crops already, or a model trained on whole frames: --face_crop off"


def recordings(inputs):
    """The recordings named: video files and frame folders, and in a folder that is not a frame folder its
    video files and frame folders, in name order; DataError naming an input that is none of these."""
    found = []
    for item in inputs:
        if os.path.isfile(item) or _is_frame_folder(item):
            found.append(item)
        elif os.path.isdir(item):
            inside = sorted(str(p) for p in Path(item).iterdir() if not p.name.startswith(".") and (
                p.suffix.lower() in data.VIDEO_EXTENSIONS or _is_frame_folder(p)))
            if not inside:
                raise data.DataError(f"{item}: no video files or frame folders in this folder")
            found += inside
        else:
            raise data.DataError(f"{item}: no such file or folder")
    return found


def _is_frame_folder(path):
    return os.path.isdir(path) and any(n.lower().endswith(data.FRAME_EXTENSIONS) for n in os.listdir(path))


def face_cropping(choice, path, modality):
    """Whether to align a recording's faces: --face_crop on or off; auto aligns a video file's frames and takes a
    frame folder's as the face crops they are. An audio model reads no frames."""
    return modality != "audio" and (choice == "on" or choice == "auto" and not os.path.isdir(path))


@dataclass
class Row:
    """One window of a recording (or, for a short one, the whole recording)."""
    start_s: float
    end_s: float
    face: float | None  # the share of its frames where a face was found; None: not looked for
    scores: torch.Tensor | None = None  # class probabilities or regression values; None: not classified (no face)
    features: torch.Tensor | None = None  # the 4C feature the head sees


def expected_ticks(path, audio, fps, modality):
    """The length of a recording in ticks of the timeline, from its container's duration (a frame folder: its
    frames); None if the container does not say."""
    if modality != "audio" and os.path.isdir(path):
        return len(data.FrameFolder(path))
    with data.reading(path, "video"), data.open_media(audio or path if modality == "audio" else path) as container:
        return round(container.duration / 1e6 * fps) if container.duration else None


def classify_windows(args, model, run, recording, faces, env, progress=None):
    """A Row per window of a data.Recording, in order: faces aligned when `faces` (a window without one is not
    classified), then each window classified as one test clip."""
    cfg, task = model.cfg, run["task"]
    crops = 1 if args.test_views == "authors" else args.num_crops  # the authors' crops are all the whole frame
    aligner = FaceAligner() if faces else None
    rows, pending = [], []  # pending: (row, video views, audio views) to classify in one batch

    def classify():
        video, audio = (torch.stack(views) for views in list(zip(*pending))[1:])
        scores, features = view_means(model, video, audio, task, env.device, lambda: autocast(args, env))
        for (row, _, _), score, feature in zip(pending, scores, features):
            row.scores, row.features = score, feature
        pending.clear()

    for window in recording.windows():
        frames, face = None, None
        if aligner is not None:
            frames, face = aligner(window.frames, window.ticks)
        elif window.frames is not None:
            frames = torch.from_numpy(np.stack(window.frames)).permute(0, 3, 1, 2)
        rows.append(Row(window.start_s, window.end_s, face))
        if face != 0.0:
            pending.append((rows[-1], *data.clip_views([(frames, window.waveform)], cfg, crops, args.test_views)))
        if len(pending) == args.batch_size:
            classify()
        if progress:
            progress.update()
    if pending:
        classify()
    return rows


def classify_short(args, model, run, path, faces, env):
    """The one Row of a recording shorter than two windows: its --num_clips x --num_crops test views, as a test
    set's clip has them (data.load_clips, data.clip_views), the faces of each clip aligned when `faces`."""
    cfg = model.cfg
    clips = data.load_clips(data.Sample(path, args.audio, None, row=None), cfg.num_frames, run["sampling_rate"],
                            cfg.audio_frames, num_clips=args.num_clips, modality=run["modality"])
    face = None
    if faces:
        aligned = [FaceAligner()(list(frames.permute(0, 2, 3, 1).numpy()), list(range(len(frames))))
                   for frames, _ in clips]
        face = sum(share for _, share in aligned) / len(aligned)
        clips = [(frames, waveform) for (frames, share), (_, waveform) in zip(aligned, clips) if share]
        if not clips:
            raise data.DataError(f"{path}: no face found in the frames of its {len(aligned)} test clips ({NOT_FACES})")
    video, audio = data.clip_views(clips, cfg, args.num_crops, args.test_views)
    scores, features = view_means(model, video[None], audio[None], run["task"], env.device, lambda: autocast(args, env))
    return Row(0.0, math.nan, face, scores[0], features[0])


def recording_rows(args, model, run, path, env):
    """(rows, seconds, short) of one recording: a Row per window, or one Row for a recording shorter than two
    windows (known from its container, else once read), and its length in seconds."""
    modality, cfg = run["modality"], model.cfg
    faces = face_cropping(args.face_crop, path, modality)
    hop = max(1, round(args.hop * args.fps)) if args.hop else None
    recording = data.Recording(path, args.audio, modality, cfg.num_frames, run["sampling_rate"], args.fps, hop)
    ticks = expected_ticks(path, args.audio, args.fps, modality)
    if ticks is None or ticks >= 2 * recording.span:
        windows = 1 + max(0, (ticks or 0) - recording.span) // recording.hop
        progress = data.Progress(f"{Path(path).name}:", windows + 1, "windows") if windows > 4 else None
        rows = classify_windows(args, model, run, recording, faces, env, progress)
        if progress:
            progress.close()
        ticks = recording.ticks
    if ticks >= 2 * recording.span:
        if faces and not any(row.face for row in rows):
            raise data.DataError(f"{path}: no face found in any of its {len(rows)} windows ({NOT_FACES})")
        return rows, ticks / args.fps, False
    row = classify_short(args, model, run, path, faces, env)
    row.end_s = ticks / args.fps
    return [row], ticks / args.fps, True


def write_timeline_csv(path, rows, names):
    """start_s, end_s, face, then a column per class probability (or regression output); empty cells where
    not measured (face) or not classified (no face)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start_s", "end_s", "face"] + list(names))
        for row in rows:
            scores = [""] * len(names) if row.scores is None else [f"{v:.6f}" for v in row.scores.tolist()]
            writer.writerow([f"{row.start_s:.4f}", f"{row.end_s:.4f}", "" if row.face is None else f"{row.face:.4f}"]
                            + scores)


def save_timeline_png(path, rows, names, task, title):
    """Each class's probability (or each regression output) over the recording, a point per window at its
    middle, the lines broken where a window has no face, grey behind those; a time axis in seconds (minutes
    and seconds past two minutes), a legend right of the plot."""
    image = Image.new("RGB", (1000, 380), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)
    box = (56, 34, 830, 334)  # the plot: left, top, right, bottom; the legend right of it
    values = torch.stack([torch.full((len(names),), math.nan) if row.scores is None else row.scores.float()
                          for row in rows])
    low, high = (0.0, 1.0) if task == "classification" else (values.nan_to_num(math.inf).min().item(),
                                                              values.nan_to_num(-math.inf).max().item())
    low, high = (low - 0.5, high + 0.5) if high - low < 1e-9 else (low, high)
    t0, t1 = rows[0].start_s, max(rows[-1].end_s, rows[0].start_s + 1e-3)

    def x(t):
        return box[0] + (t - t0) / (t1 - t0) * (box[2] - box[0])

    def y(v):
        return box[3] - (v - low) / (high - low) * (box[3] - box[1])

    centres = [(row.start_s + row.end_s) / 2 for row in rows]
    _shade_no_face(draw, rows, centres, x, box)
    for k in range(5):  # the value axis: 5 grid lines
        v = low + k * (high - low) / 4
        draw.line((box[0], y(v), box[2], y(v)), fill=(210, 210, 210))
        draw.text((box[0] - 6, y(v)), f"{v:.2f}", font=font, fill="black", anchor="rm")
    _time_axis(draw, font, t0, t1, x, box, image.height)
    for k, name in enumerate(names):
        colour = TIMELINE_COLOURS[k % len(TIMELINE_COLOURS)]
        _draw_series(draw, [(x(c), y(v)) for c, v in zip(centres, values[:, k].tolist())], colour)
        legend_y = box[1] + 8 + 18 * k
        draw.line((box[2] + 14, legend_y, box[2] + 34, legend_y), fill=colour, width=3)
        draw.text((box[2] + 40, legend_y), _fit(name, font, image.width - box[2] - 44), font=font, fill="black",
                  anchor="lm")
    draw.rectangle(box, outline="black")
    what = "probability of each class" if task == "classification" else "outputs"
    grey = "; grey: no face" if any(row.face is not None for row in rows) else ""
    draw.text((box[0], box[1] // 2), _fit(f"{title}: {what}, a point per window{grey}", font, image.width - 64),
              font=font, fill="black", anchor="lm")
    image.save(path, format="PNG")


def _shade_no_face(draw, rows, centres, x, box):
    """Grey behind each window without a face: from halfway to the window before to halfway to the next."""
    for i, row in enumerate(rows):
        if row.scores is None:
            a = (centres[i - 1] + centres[i]) / 2 if i else row.start_s
            b = (centres[i] + centres[i + 1]) / 2 if i + 1 < len(rows) else row.end_s
            draw.rectangle((x(a), box[1], x(b), box[3]), fill=(225, 225, 225))


def _time_axis(draw, font, t0, t1, x, box, height):
    """At most 10 ticks a round number of seconds apart, labelled in seconds or, past two minutes, min:s."""
    minutes = t1 - t0 >= 120
    step = next(s for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200) if (t1 - t0) / s <= 10)
    tick = math.ceil(t0 / step) * step
    while tick <= t1 + 1e-9:
        label = f"{int(tick) // 60}:{int(tick) % 60:02d}" if minutes else f"{tick:g}"
        draw.line((x(tick), box[3], x(tick), box[3] + 4), fill="black")
        draw.text((x(tick), box[3] + 6), label, font=font, fill="black", anchor="mt")
        tick += step
    draw.text(((box[0] + box[2]) / 2, height - 6), "time (min:s)" if minutes else "time (s)", font=font,
              fill="black", anchor="md")


def _draw_series(draw, points, colour):
    """Lines through the points (x, y), broken at a NaN y; a point alone is a dot."""
    stretches = [[]]
    for point in points:
        if math.isnan(point[1]):
            stretches.append([])
        else:
            stretches[-1].append(point)
    for stretch in stretches:
        if len(stretch) == 1:
            (px, py), = stretch
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        elif stretch:
            draw.line(stretch, fill=colour, width=2)


def recording_summary(path, rows, seconds, names, task, top_k):
    """One line: the recording, its length, its windows (with a face), and the top classes by mean probability
    over the windows classified with the share of those where each is on top (regression: each output's mean,
    least and greatest)."""
    classified = torch.stack([row.scores for row in rows if row.scores is not None])
    looked = any(row.face is not None for row in rows)
    counted = f"{len(rows)} windows" + (f", {len(classified)} with a face" if looked else "")
    if task == "classification":
        mean, on_top = classified.mean(0), torch.bincount(classified.argmax(1), minlength=len(names)) / len(classified)
        parts = [f"{names[c]} {mean[c]:.2f} (on top {on_top[c]:.0%})" for c in mean.argsort(descending=True)[:top_k]]
    else:
        parts = [f"{name} {v.mean():.3f} ({v.min():.3f} to {v.max():.3f})" for name, v in zip(names, classified.T)]
    return f"{path}: {seconds:.1f} s, {counted}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# 7. Frozen-feature evaluation of a checkpoint against random initialisation and no model: linear, k-NN and
# few-label probes, audio-video retrieval, and the reconstruction loss against the constant predictor

PROBE_L2 = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # the ridge penalties, picked by cross-validation


def standardise(train, test):
    """Features scaled by the training split's mean and std."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_ridge(x, y, l2):
    """The ridge predictor in closed form: it minimises mean |y - x W - b|^2 + l2 |W|^2."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    gram = xc.T @ xc / len(x) + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, xc.T @ (y - mean_y) / len(x))
    return lambda z: (z - mean_x) @ w + mean_y


def probe_score(pred, y, task):
    """Accuracy of the arg max (classification) or mean CCC (regression)."""
    if task == "classification":
        return (pred.argmax(1) == y).double().mean().item()
    return regression_metrics(pred, y)["ccc"]


def linear_probe(train_x, train_y, test_x, test_y, task, num_classes, folds=5, seed=0):
    """Test score of a ridge map of the standardised features (to one-hot targets for classification), its
    penalty picked by `folds`-fold cross-validation on the training split."""
    train_x, test_x = standardise(train_x.double(), test_x.double())
    targets = F.one_hot(train_y, num_classes).double() if task == "classification" else train_y.double()
    folds = min(folds, len(train_x))  # no empty fold
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty_like(order)
    fold_of[order] = torch.arange(len(order)) % folds
    best, best_l2 = -math.inf, None
    for l2 in PROBE_L2:
        score = sum(probe_score(fit_ridge(train_x[fold_of != k], targets[fold_of != k], l2)(train_x[fold_of == k]),
                                train_y[fold_of == k], task) for k in range(folds)) / folds
        if score > best:  # ties keep the smaller penalty
            best, best_l2 = score, l2
    return probe_score(fit_ridge(train_x, targets, best_l2)(test_x), test_y, task)


def knn_probe(train_x, train_y, test_x, test_y, task, num_classes, k=20, temperature=0.07):
    """k nearest training clips by cosine similarity of the standardised features: votes weighted by
    exp(similarity / temperature), or for regression the neighbours' mean target."""
    train_x, test_x = standardise(train_x.double(), test_x.double())
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    top, idx = sims.topk(min(k, len(train_x)), dim=1)
    if task == "regression":
        return probe_score(train_y[idx].mean(1), test_y, task)
    votes = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
    return probe_score(votes, test_y, task)


def few_label_subsets(y, per_class, count, seed=0):
    """`count` random subsets of the training split with `per_class` clips of every class."""
    g = torch.Generator().manual_seed(seed)
    subsets = []
    for _ in range(count):
        picks = [torch.nonzero(y == c)[:, 0] for c in y.unique()]
        subsets.append(torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks]))
    return subsets


def retrieval(video_emb, audio_emb):
    """Per layer of video_emb, audio_emb (L, N, C): the share of clips whose partner is the nearest (top1) or
    among the 5 nearest (top5) by cosine similarity, audio to video (a2v) and video to audio (v2a)."""
    sims = F.normalize(audio_emb, dim=-1) @ F.normalize(video_emb, dim=-1).transpose(1, 2)
    truth = torch.arange(sims.shape[1])
    out = {}
    for name, s in (("a2v", sims), ("v2a", sims.transpose(1, 2))):
        rank = (s > s[:, truth, truth][..., None]).sum(-1)  # clips scored above the partner (L, N)
        out[f"{name}_top1"] = (rank < 1).double().mean(1).tolist()
        out[f"{name}_top5"] = (rank < 5).double().mean(1).tolist()
    return out


@torch.no_grad()
def extract_features(models, loader, device, inter_layers):
    """One pass over the data: per model and clip, averaged over its views, the feature's parts and the
    pooled encoder layers at inter_layers; last, no model: per mel bin the mean and std over time of the
    log-Mel, per channel the mean and std over time of 4 x 4 average-pooled pixels ("plain_*")."""
    outs = [{} for _ in range(len(models) + 1)]
    for batch in loader:
        video, audio = batch["video"].flatten(0, 1), batch["audio"].flatten(0, 1)  # (B * V, ...)
        views = batch["video"].shape[1]
        pooled = F.adaptive_avg_pool3d(video, (video.shape[2], 4, 4))  # (BV, 3, T, 4, 4)
        found = [dict(plain_audio=torch.cat([audio.mean(2).flatten(1), audio.std(2).flatten(1)], 1),
                      plain_video=torch.cat([pooled.mean(2).flatten(1), pooled.std(2).flatten(1)], 1))]
        for model in models:
            parts = model.eval().forward_parts(video.to(device), audio.to(device))
            values = {k: parts[k] for k in FEATURE_PARTS if k in parts}
            for m in ("video", "audio"):
                if f"{m}_layers" in parts:
                    values[f"{m}_emb"] = parts[f"{m}_layers"][:, list(inter_layers)]
            found.insert(-1, values)
        for out, values in zip(outs, found):
            for k, x in values.items():
                out.setdefault(k, []).append(mean_over_views(x, views))
            out.setdefault("index", []).append(torch.as_tensor(batch["index"]))
    results = []
    for out in outs:
        out = {k: torch.cat(x) for k, x in out.items()}
        order = out.pop("index").argsort()
        results.append({k: x[order] for k, x in out.items()})
    return results


def feature_sets(feats, modality):
    """The probed sets: av (all parts), audio, video; with modality None, those of no model."""
    if modality is None:
        return {"av": torch.cat([feats["plain_video"], feats["plain_audio"]], 1),
                "audio": feats["plain_audio"], "video": feats["plain_video"]}
    sets = {"av": torch.cat([feats[k] for k in FEATURE_PARTS if k in feats], 1)} if modality == "av" else {}
    sets.update({m: feats[m] for m in ("audio", "video") if m in feats})
    return sets


def probe_all(train, test, train_y, test_y, task, num_classes, args, modality):
    """Every probe figure of one model's features (of no model when modality is None)."""
    sets, test_sets = feature_sets(train, modality), feature_sets(test, modality)
    result = {}
    for name, x in sets.items():
        result[f"{name}_linear"] = linear_probe(x, train_y, test_sets[name], test_y, task, num_classes)
        result[f"{name}_knn"] = knn_probe(x, train_y, test_sets[name], test_y, task, num_classes, args.knn_k)
        if args.labels_per_class and task == "classification":
            scores = [linear_probe(x[s], train_y[s], test_sets[name], test_y, task, num_classes,
                                   folds=min(5, args.labels_per_class), seed=i)
                      for i, s in enumerate(few_label_subsets(train_y, args.labels_per_class, args.subsets))]
            result[f"{name}_few"] = sum(scores) / len(scores)
    if modality and "video_emb" in test and "audio_emb" in test:
        found = retrieval(test["video_emb"].transpose(0, 1), test["audio_emb"].transpose(0, 1))
        result.update(found)
        result["retrieval_top1"] = found["a2v_top1"][-1]  # the deepest selected layer
    return result


@torch.no_grad()
def reconstruction_vs_constant(pretrain_model, samples, cfg, sampling_rate, batch_size, num_workers, device, seed=0):
    """Mean masked-token MSE of a pre-training model (pre-training crops and masks) and of the best constant
    (each target's mean over the set): loss_video, const_video, loss_audio, const_audio."""
    dataset = data.PretrainDataset(samples, cfg, sampling_rate=sampling_rate, seed=seed, strict=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    pretrain_model.eval()
    sums = {}
    for batch in loader:
        batch = to_device(batch, device)
        video, audio, vm, am = batch["video"], batch["audio"], batch["video_mask"], batch["audio_mask"]
        out = pretrain_model(video, audio, vm, am)
        for name, pred, target in zip(("video", "audio"), (out["video_pred"], out["audio_pred"]),
                                      reconstruction_targets(video, audio, vm, am, cfg)):
            target = target.double().flatten(0, 1)
            for key, value in ((f"se_{name}", ((pred.double().flatten(0, 1) - target) ** 2).sum(0)),
                               (f"sum_{name}", target.sum(0)), (f"sq_{name}", (target ** 2).sum(0)),
                               (f"n_{name}", torch.tensor(float(len(target))))):
                sums[key] = sums.get(key, 0) + value.cpu()
    result = {}
    for name in ("video", "audio"):
        n, dims = sums[f"n_{name}"], sums[f"sum_{name}"].numel()
        result[f"loss_{name}"] = (sums[f"se_{name}"].sum() / (n * dims)).item()
        result[f"const_{name}"] = ((sums[f"sq_{name}"] - sums[f"sum_{name}"] ** 2 / n).sum() / (n * dims)).item()
    return result


def seed_statistics(results):
    """The mean of every figure over the random initialisations, and the sd of the scalar ones."""
    scalars = [k for k in results[0] if not isinstance(results[0][k], list)]
    mean = {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
    return ({k: float(v) if k in scalars else v.tolist() for k, v in mean.items()},
            {k: float(np.std([r[k] for r in results])) for k in scalars})


def probe_data(args, env):
    """(task, training samples, test samples) of the probes: --data_path and --test_path, by default the demo's."""
    if args.data_path is None:
        args.data_path, args.test_path = demo_manifests(env)
    if args.test_path is None:
        raise ValueError("--probe needs --test_path TEST with --data_path TRAIN")
    task = data.guess_task(args.data_path)
    if task == "pretrain":
        raise ValueError(f"{args.data_path}: the probes need labelled rows (a class index or regression targets)")
    return (task, *(data.read_manifest(path, args.root_map, task) for path in (args.data_path, args.test_path)))


def probe_checkpoint(args):
    """Probe --checkpoint, the same model at random initialisation and no model: print, and write --json."""
    env = setup(args)
    model, run = load_finetuned(args.checkpoint, env.device, num_outputs=1, log=None, heads=args.heads)
    cfg = model.cfg
    task, train_samples, test_samples = probe_data(args, env)
    train_y, test_y = (torch.tensor([s.target for s in samples]) for samples in (train_samples, test_samples))
    num_classes = int(max(train_y.max(), test_y.max())) + 1 if task == "classification" else None
    loaders = [test_loader(samples, cfg, run["sampling_rate"], args) for samples in (train_samples, test_samples)]
    models = [model]
    for seed in range(args.random_seeds):
        torch.manual_seed(seed)
        models.append(HiCMAEClassifier(cfg, run["modality"], 1))
    models = [m.to(env.device) for m in models]
    train, test = (extract_features(models, loader, env.device, cfg.inter_layers) for loader in loaders)
    found = [probe_all(a, b, train_y, test_y, task, num_classes, args, run["modality"])
             for a, b in zip(train[:-1], test[:-1])]
    results = dict(pretrained=found[0], **dict(zip(("random", "random_sd"), seed_statistics(found[1:]))),
                   no_model=probe_all(train[-1], test[-1], train_y, test_y, task, num_classes, args, None))
    if not run["authors"] and run["num_outputs"] is None:  # our pre-training checkpoint: the decoders reconstruct
        pretrained = load_weights(HiCMAE(cfg), model_state(load_checkpoint(args.checkpoint)), log=None)
        results["pretrained"].update(reconstruction_vs_constant(pretrained.to(env.device), test_samples, cfg,
                                                                run["sampling_rate"], args.batch_size,
                                                                args.num_workers, env.device))
    results["setting"] = dict(
        checkpoint=str(args.checkpoint), train=args.data_path, test=args.test_path, train_clips=len(train_samples),
        test_clips=len(test_samples), task=task, views=f"{args.num_clips} clips x {args.num_crops} crops",
        random_seeds=args.random_seeds, labels_per_class=args.labels_per_class, knn_k=args.knn_k,
        inter_layers=list(cfg.inter_layers))
    print(format_probe(results, task))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


def format_probe(results, task):
    """The probe table: a row per figure; columns the checkpoint, random initialisation and no model."""
    pre, rnd, sd, plain, setting = (results[k] for k in ("pretrained", "random", "random_sd", "no_model", "setting"))
    def unit(v):
        return metric_text(v, task)

    rows = [["", "checkpoint", f"random init ({setting['random_seeds']} seeds)", "no model"]]
    names = {"linear": "linear probe", "knn": f"k-NN (k {setting['knn_k']})",
             "few": f"linear probe, {setting['labels_per_class']} labels per class"}
    for key in pre:
        modality, _, kind = key.partition("_")
        if kind in names:
            rows.append([f"{modality} {names[kind]}", unit(pre[key]), f"{unit(rnd[key])} (sd {unit(sd[key])})",
                         unit(plain[key]) if key in plain else ""])
    for key in ("a2v_top1", "a2v_top5", "v2a_top1", "v2a_top5"):
        for layer, a, b in zip(setting["inter_layers"], pre.get(key, []), rnd.get(key, [])):
            rows.append([f"retrieval {key.replace('2', '->').replace('_', ' ')} (layer {layer})",
                         metric_text(a), metric_text(b), ""])
    lines = _table(rows)
    for m in ("video", "audio"):
        if f"loss_{m}" in pre:
            loss, const = pre[f"loss_{m}"], pre[f"const_{m}"]
            lines.append(f"{m} reconstruction on the test clips: loss {loss:.4f}, constant predictor {const:.4f} "
                         f"({loss / const - 1:+.1%})")
    measure = "accuracy" if task == "classification" else "mean CCC"
    header = (f"frozen features of {setting['checkpoint']}: {setting['train_clips']} train / "
              f"{setting['test_clips']} test clips, {setting['views']}, test {measure}")
    return "\n".join([header] + lines)


# ----------------------------------------------------------------------------------------------
# 8. Summary over the folds of a cross-validation: `python evaluate.py --summarize RUN_DIR ...`

SUMMARY_FILES = {"best": "predictions-best.csv", "last": "predictions-last.csv"}  # what finetune.py writes


def summarize(run_dirs):
    """{"best": {"folds": {run_dir: metrics}, "mean": ..., "sd": ...}, "last": ...}, the task and the dimension
    names: each folder's scalar metrics (fractions; regression's per dimension too) of its predictions-best.csv
    and predictions-last.csv (a folder of evaluate.py --checkpoint: predictions.csv for both), their mean and
    sample sd (n - 1; None for one fold)."""
    summary, tasks = {}, {}
    for kind, file_name in SUMMARY_FILES.items():
        folds = {}
        for run_dir in run_dirs:
            path = _predictions_file(run_dir, file_name)
            _, targets, scores, task, names = read_predictions(path)
            tasks.setdefault((task, tuple(names) if task == "regression" else None), path)
            if len(tasks) > 1:
                raise ValueError(f"{' and '.join(tasks.values())}: different tasks (or regression dimensions)")
            metrics = compute_metrics(scores, targets, task, names)
            folds[run_dir] = {k: v for k, v in metrics.items()
                              if k in CLASSIFICATION_KEYS or k.removeprefix("per_dim_") in REGRESSION_KEYS}
        # a metric is a number or, per dimension, a list: numpy's statistics over axis 0 take either
        columns = {k: np.array([m[k] for m in folds.values()], dtype=np.float64) for k in folds[run_dirs[0]]}
        mean = {k: v.mean(0).tolist() for k, v in columns.items()}
        sd = {k: v.std(0, ddof=1).tolist() if len(run_dirs) > 1 else None for k, v in columns.items()}
        summary[kind] = dict(folds=folds, mean=mean, sd=sd)
    task, names = next(iter(tasks))
    return summary, task, names


def _predictions_file(run_dir, file_name):
    """run_dir's file_name, or the predictions.csv of an evaluate.py --checkpoint folder (which has no other)."""
    single = os.path.join(run_dir, "predictions.csv")
    if os.path.exists(single) and not any(os.path.exists(os.path.join(run_dir, n)) for n in SUMMARY_FILES.values()):
        return single
    path = os.path.join(run_dir, file_name)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (a run folder of finetune.py holds predictions-best.csv and "
                         "predictions-last.csv; one of evaluate.py --checkpoint, predictions.csv)")
    return path


def summarize_runs(run_dirs, json_path=None):
    """Print a table per kind (best, last), a row per fold, the mean and the sd, in format_metrics' units and
    columns; write the summary to json_path."""
    summary, task, names = summarize(run_dirs)
    keys = CLASSIFICATION_KEYS if task == "classification" else REGRESSION_KEYS
    if task == "classification":
        header = [CLASSIFICATION_LABELS[k] for k in keys]
    else:
        header = [f"{key.upper()} {name}" for key in keys for name in list(names) + ["mean"]]

    def cells(metrics):
        if task == "classification":
            values = [metrics[k] for k in keys]
        else:
            values = [v for key in keys for v in metrics[f"per_dim_{key}"] + [metrics[key]]]
        return ["" if v is None else metric_text(v, task) for v in values]

    print(f"{len(run_dirs)} fold{'s' if len(run_dirs) > 1 else ''}, {task}; mean and sample sd over the folds "
          "(none for one fold)")
    for kind, file_name in SUMMARY_FILES.items():
        rows = [[f"{kind} ({file_name})"] + header]
        named = list(summary[kind]["folds"].items()) + [(stat, summary[kind][stat]) for stat in ("mean", "sd")]
        rows += [[name] + cells(metrics) for name, metrics in named]
        print("\n".join(_table(rows)) + ("\n" if kind == "best" else ""))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
        print(f"wrote {json_path}")
    return summary


# ----------------------------------------------------------------------------------------------
# 9. Command line

def write_file(path, write, what):
    """write(path), then print where it went, saying so when it replaced an earlier file."""
    verb = "replaced" if os.path.exists(path) else "wrote"
    write(path)
    print(f"{verb} {path}: {what}")


def report(scores, targets, task, names=None, png=None, title=None):
    """Print every metric; for classification with png, also draw the confusion matrix (titled) there."""
    metrics = compute_metrics(scores, targets, task, names)
    print(format_metrics(metrics, names))
    if png and task == "classification":
        os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
        write_file(png, lambda p: save_confusion_png(metrics["confusion"], p, names, title), "the confusion matrix")
    return metrics


def report_predictions(path, output_dir=None):
    """Print every metric of a predictions file and draw its confusion matrix: output_dir/confusion.png,
    or without output_dir, <file name>-confusion.png beside the file."""
    _, targets, scores, task, names = read_predictions(path)
    print(f"{path}: {len(targets)} videos, {task}")
    png = os.path.join(output_dir, "confusion.png") if output_dir else f"{os.path.splitext(path)[0]}-confusion.png"
    return report(scores, targets, task, names, png, title=str(path))


def save_features(path, features, rows="one row per video"):
    write_file(path, lambda p: np.save(p, features.numpy()), f"features {tuple(features.shape)}, {rows}")


def test_checkpoint(args, model, run, env, names):
    """Multi-view test of a manifest: print the metrics, write predictions.csv (and confusion.png)."""
    samples = data.read_manifest(args.data_path, args.root_map, run["task"])
    loader = test_loader(samples, model.cfg, run["sampling_rate"], args, run["modality"])
    rows, targets, scores, features = test_pass(model, loader, run["task"], env.device, lambda: autocast(args, env),
                                                features=bool(args.features))
    output_dir = default_output_dir(args)
    os.makedirs(output_dir, exist_ok=True)
    write_file(os.path.join(output_dir, "predictions.csv"),
               lambda p: write_predictions(p, [s.video for s in rows], targets, scores, run["task"], names),
               f"{len(samples)} videos, {run['task']}, {args.num_clips} clips x {args.num_crops} crops")
    if args.features:
        save_features(args.features, features)
    return report(scores, targets, run["task"], names, os.path.join(output_dir, "confusion.png"), str(args.checkpoint))


def default_output_dir(args):
    return args.output_dir or Path(args.checkpoint).parent / f"eval-{Path(args.checkpoint).stem}"


def classify_recordings(args, model, run, env, names):
    """--video (files and folders), or an audio model's --audio: per recording NAME.timeline.csv, NAME.timeline.png
    (and with --features NAME.features.npy, a row per window of the timeline) in --output_dir, and one summary
    line; a recording shorter than two windows gets one row, its test views' answer, printed as its top
    classes. A recording that fails is named with the reason and the others go on; returns how many failed."""
    paths = recordings(args.video) if args.video else [args.audio]
    check_recordings(args, run["modality"], paths)
    names = _names(names, model.head.out_features)
    out = Path(default_output_dir(args))
    out.mkdir(parents=True, exist_ok=True)
    failed, seen = 0, {}
    for path in paths:
        name = Path(path).name if os.path.isdir(path) else Path(path).stem
        try:
            if name in seen:
                raise data.DataError(f"{path}: same name as {seen[name]}: both would be {out / name}.timeline.csv; "
                                     "left out")
            seen[name] = path
            rows, seconds, short = recording_rows(args, model, run, path, env)
        except data.DataError as e:
            print(f"evaluate.py: {e}", file=sys.stderr)
            failed += 1
            continue
        write_timeline(args, out / name, path, rows, seconds, short, names, run["task"])
    if len(paths) > 1:
        print(f"{len(paths) - failed} of {len(paths)} recordings done; their timelines are in {out}/")
    return failed


def check_recordings(args, modality, paths):
    """Stop before any work where the recordings cannot be classified: a model without its stream, flags that
    name one recording's files for several, faces to align without the face extra."""
    if not args.video and modality != "audio":
        raise ValueError(f"an {'audio-visual' if modality == 'av' else 'video'} model needs --video FILE")
    if len(paths) > 1 and (args.audio or args.features):
        raise ValueError(f"{len(paths)} recordings: --audio FILE and --features OUT.npy name one recording's "
                         "(--features alone writes each recording's NAME.features.npy)")
    if any(face_cropping(args.face_crop, path, modality) for path in paths):
        try:
            load_face_models()
        except ImportError:
            raise SystemExit(f"evaluate.py: --face_crop {args.face_crop} (video files are aligned as the training "
                             f"crops were): {FACES_MISSING}, or --face_crop off") from None


def write_timeline(args, stem, path, rows, seconds, short, names, task):
    """STEM.timeline.csv, STEM.timeline.png (not for a short recording: it prints its top classes instead),
    the summary line, and with --features the features (NaN for a window without a face)."""
    write_timeline_csv(f"{stem}.timeline.csv", rows, names)
    if short:
        print_top(path, rows[0].scores, names, task, args)
    else:
        save_timeline_png(f"{stem}.timeline.png", rows, names, task, Path(path).name)
        print(recording_summary(path, rows, seconds, names, task, args.top_k))
    if args.features is not None:
        width = next(row.features for row in rows if row.features is not None).shape
        features = torch.stack([torch.full(width, math.nan) if row.features is None else row.features for row in rows])
        save_features(args.features or f"{stem}.features.npy", features, "a row per row of the timeline")


def print_top(path, scores, names, task, args):
    """A recording's answer: its top classes with their probabilities (or the regression values)."""
    print(f"{path}: {args.num_clips} clips x {args.num_crops} crops")
    if task == "classification":
        top = scores.argsort(descending=True)[:args.top_k].tolist()
        lines = _table([[names[c], f"{scores[c].item():.4f}"] for c in top])
    else:
        lines = _table([[name, f"{value:.4f}"] for name, value in zip(names, scores.tolist())])
    print("\n".join("  " + line for line in lines))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint of finetune.py (best.pth, last.pth) or an authors' "
                                             "fine-tuned one (checkpoint-best.pth)")
    source.add_argument("--predictions", metavar="FILE.csv", help="recompute the metrics of a predictions file")
    source.add_argument("--summarize", nargs="+", metavar="RUN_DIR",
                        help="the metrics of the folds of a cross-validation, their mean and sample sd: each "
                             "RUN_DIR's predictions-best.csv and predictions-last.csv (finetune.py's output_dir), "
                             "or its predictions.csv for both (evaluate.py --checkpoint's output_dir)")
    parser.add_argument("--data_path", metavar="TEST", help="the test manifest (with --probe: the training manifest)")
    parser.add_argument("--probe", action="store_true",
                        help="frozen-feature evaluation of --checkpoint (pre-training or fine-tuning): linear and "
                             "k-NN probes, retrieval, reconstruction, against random initialisation (default data: "
                             "the demo)")
    parser.add_argument("--test_path", metavar="TEST", help="with --probe: the test manifest")
    parser.add_argument("--json", metavar="OUT.json",
                        help="with --probe or --summarize: write every figure to this file")
    parser.add_argument("--labels_per_class", type=int, default=8,
                        help="with --probe: also probe with this many training clips per class (0: off)")
    parser.add_argument("--subsets", type=int, default=5, help="with --probe: few-label subsets averaged")
    parser.add_argument("--random_seeds", type=int, default=3, help="with --probe: random initialisations compared")
    parser.add_argument("--knn_k", type=int, default=20, help="with --probe: neighbours of the k-NN probe")
    data.add_root_map(parser)
    g = parser.add_argument_group("recordings (--video)")
    g.add_argument("--video", nargs="+", metavar="FILE_OR_FOLDER",
                   help="recordings to follow window by window: video files, frame folders, and folders of them")
    g.add_argument("--audio", help="the audio file of one recording (default: the video file's own audio; a video "
                                   "model reads none, an audio model needs only this)")
    g.add_argument("--face_crop", choices=FACE_CROP, default="auto",
                   help="align the faces as the training crops were (OpenFace 2.2's alignment; needs "
                        "requirements-faces.txt): auto aligns video files and takes frame folders as the crops "
                        "they are")
    g.add_argument("--fps", type=float, default=25.0,
                   help="frames per second the model sees: a recording's frames are taken at this rate by their "
                        "timestamps (VoxCeleb2's 25; the rate of the data the model was fine-tuned on, e.g. 30 "
                        "for CREMA-D)")
    g.add_argument("--hop", type=float, default=None,
                   help="seconds between windows (default: half a window, 1.28 s for 16 frames 4 apart at 25 fps)")
    parser.add_argument("--class_names", nargs="+",
                        help="names of the classes, in index order (default: the checkpoint's)")
    g.add_argument("--top_k", type=int, default=5, help="classes printed for a recording")
    parser.add_argument("--features", metavar="OUT.npy", nargs="?", const="",
                        help="save the features the head sees: one row per video of --data_path; for recordings one "
                             "row per window, row for row with the timeline (alone: OUTPUT_DIR/NAME.features.npy)")
    parser.add_argument("--output_dir", help="where to write predictions.csv and confusion.png (default: "
                                             "eval-<checkpoint name>/ beside the checkpoint; with --predictions, "
                                             "<file name>-confusion.png beside the file)")
    parser.add_argument("--num_clips", type=int, default=None, help="clips per video (default: the checkpoint's, 2)")
    parser.add_argument("--num_crops", type=int, default=None, help="crops per clip (default: the checkpoint's, 2)")
    parser.add_argument("--test_views", default=None, choices=data.TEST_VIEWS,
                        help="authors: each frame resized to the model's size, aspect ignored (their test views); "
                             "short_side: aspect kept, crops along the long side (default: the checkpoint's, authors)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads of an authors' checkpoint (default: from its width, as their model "
                             "names: 256 -> 4, 384 -> 6, 512 -> 8)")
    parser.add_argument("--batch_size", type=int, default=8, help="videos per batch")
    add_device_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and not args.probe:
        check_checkpoint_usage(parser, args)
    try:
        return run_command(args)
    except (ValueError, data.DataError) as e:  # a malformed file or a bad row: the message names it
        raise SystemExit(f"evaluate.py: {e}") from None
    except OSError as e:  # a file that is not there or cannot be read
        raise SystemExit(f"evaluate.py: {e.filename}: {e.strerror}") from None


def check_checkpoint_usage(parser, args):
    """A usage error unless --checkpoint has one thing to test: a manifest or recordings."""
    if args.data_path and (args.video or args.audio):
        parser.error("--data_path TEST tests a manifest, --video/--audio one recording: give one of them")
    if not (args.data_path or args.video or args.audio):
        parser.error("--checkpoint needs --data_path TEST or --video FILE (an audio model: --audio FILE)")
    if args.data_path and args.features == "":
        parser.error("--features OUT.npy: name the file of the manifest's features")


def run_command(args):
    """Do what the flags ask: recompute a predictions file's metrics, summarise folds, probe a checkpoint, or
    test a fine-tuned checkpoint on a manifest or recordings. Returns the exit status."""
    if args.predictions:
        report_predictions(args.predictions, args.output_dir)
        return 0
    if args.summarize:
        summarize_runs(args.summarize, args.json)
        return 0
    if args.probe:
        args.num_clips, args.num_crops, args.dtype = args.num_clips or 2, args.num_crops or 2, args.dtype or "fp32"
        probe_checkpoint(args)
        return 0
    env = setup(args)
    model, run = load_finetuned(args.checkpoint, env.device, heads=args.heads)
    test_as_run(args, run, env)
    names = args.class_names or run.get("class_names")
    if args.video or args.audio:
        return 1 if classify_recordings(args, model, run, env, names) else 0
    test_checkpoint(args, model, run, env, names)
    return 0


def test_as_run(args, run, env):
    """What the flags leave open, as the run tested: its views and, on a GPU, its dtype (on CPU only --dtype)."""
    args.num_clips = args.num_clips or run.get("num_clips", 2)
    args.num_crops = args.num_crops or run.get("num_crops", 2)
    args.test_views = args.test_views or run.get("test_views", "authors")
    if env.device.type == "cuda":
        args.dtype = args.dtype or run.get("dtype")


if __name__ == "__main__":
    sys.exit(main())
