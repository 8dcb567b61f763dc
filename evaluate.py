"""Evaluation for HiCMAE: metrics, predictions files, multi-view testing, single-video inference and
frozen-feature probes (the README tells more).

  python evaluate.py --checkpoint C --data_path TEST        test a fine-tuned checkpoint (ours or the authors')
                                                            on a manifest: metrics, predictions.csv, confusion.png
  python evaluate.py --predictions FILE.csv                 every metric of a predictions file, and its confusion.png
  python evaluate.py --checkpoint C --video FILE [--audio FILE]
                                                            the class probabilities (or values) of one recording
  python evaluate.py --probe --checkpoint C [--data_path TRAIN --test_path TEST] [--json OUT.json]
                                                            frozen features of any checkpoint against random
                                                            initialisation and no model (default: the demo data)
  python evaluate.py --summarize RUN_DIR ... [--json OUT.json]
                                                            every fold's metrics, their mean and sample sd
Add --features OUT.npy to a checkpoint form to save the features the head sees, one row per video.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys
from contextlib import nullcontext
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
    header = reader.fieldnames or []
    task = "classification" if header[1:2] == ["target"] else "regression"
    prefix = "score_" if task == "classification" else "pred_"
    names = [c[len(prefix):] for c in header if c.startswith(prefix)]
    target_columns = ["target"] if task == "classification" else [f"target_{n}" for n in names]
    if not names or header != ["path"] + target_columns + [prefix + n for n in names]:
        raise ValueError(f"{path}: not a predictions file (header {header})")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # where DictReader puts cells beyond the header, or missing ones
            raise ValueError(f"{path}:{line}: not one cell per column of the header")
    try:
        targets = torch.tensor([[float(row[c]) for c in target_columns] for row in rows], dtype=torch.float64)
        scores = torch.tensor([[float(row[prefix + n]) for n in names] for row in rows], dtype=torch.float64)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    targets = targets.reshape(len(rows), len(target_columns))
    if task == "classification":
        targets = targets[:, 0].long()
    return [row["path"] for row in rows], targets, scores.reshape(len(rows), len(names)), task, names


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
        video, audio = batch["video"].to(device), batch["audio"].to(device)  # (B, V, ...)
        b, v = video.shape[:2]
        with amp():
            feature = model.forward_features(video.flatten(0, 1), audio.flatten(0, 1))
            out = model.head(feature).float().view(b, v, -1)
        scores.append((out.softmax(-1) if task == "classification" else out).mean(1).cpu())
        if features:
            feats.append(feature.float().view(b, v, -1).mean(1).cpu())
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
# 5. Frozen-feature evaluation of a checkpoint against random initialisation and no model: linear, k-NN and
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
        b, v = batch["video"].shape[:2]
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
                out.setdefault(k, []).append(x.float().cpu().view(b, v, *x.shape[1:]).mean(1))
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


def probe_checkpoint(args):
    """Probe --checkpoint, the same model at random initialisation and no model: print, and write --json."""
    env = setup(args)
    model, run = load_finetuned(args.checkpoint, env.device, num_outputs=1, log=None, heads=args.heads)
    cfg = model.cfg
    if args.data_path is None:
        args.data_path, args.test_path = demo_manifests(env)
    if args.test_path is None:
        raise ValueError("--probe needs --test_path TEST with --data_path TRAIN")
    task = data.guess_task(args.data_path)
    if task == "pretrain":
        raise ValueError(f"{args.data_path}: the probes need labelled rows (a class index or regression targets)")
    train_samples, test_samples = (data.read_manifest(p, args.root_map, task) for p in (args.data_path, args.test_path))
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
# 6. Summary over the folds of a cross-validation: `python evaluate.py --summarize RUN_DIR ...`

SUMMARY_FILES = {"best": "predictions-best.csv", "last": "predictions-last.csv"}  # what finetune.py writes


def summarize(run_dirs):
    """{"best": {"folds": {run_dir: metrics}, "mean": ..., "sd": ...}, "last": ...}, the task and the dimension
    names: each folder's scalar metrics (fractions; regression's per dimension too) of its predictions-best.csv
    and predictions-last.csv (a folder of evaluate.py --checkpoint: predictions.csv for both), their mean and
    sample sd (n - 1; None for one fold)."""
    def over_folds(statistic, values):  # per dimension where each fold has a list
        return [statistic(list(v)) for v in zip(*values)] if isinstance(values[0], list) else statistic(values)

    sd = statistics.stdev if len(run_dirs) > 1 else (lambda values: None)
    summary, tasks = {}, {}
    for kind, file_name in SUMMARY_FILES.items():
        folds = {}
        for run_dir in run_dirs:
            path = os.path.join(run_dir, file_name)
            single = os.path.join(run_dir, "predictions.csv")
            if os.path.exists(single) and not any(os.path.exists(os.path.join(run_dir, name))
                                                  for name in SUMMARY_FILES.values()):
                path = single
            elif not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (a run folder of finetune.py holds predictions-best.csv "
                                 "and predictions-last.csv; one of evaluate.py --checkpoint, predictions.csv)")
            _, targets, scores, task, names = read_predictions(path)
            tasks.setdefault((task, tuple(names) if task == "regression" else None), path)
            if len(tasks) > 1:
                raise ValueError(f"{' and '.join(tasks.values())}: different tasks (or regression dimensions)")
            metrics = compute_metrics(scores, targets, task, names)
            folds[run_dir] = {k: v for k, v in metrics.items()
                              if k in CLASSIFICATION_KEYS or k.removeprefix("per_dim_") in REGRESSION_KEYS}
        columns = {k: [m[k] for m in folds.values()] for k in folds[run_dirs[0]]}
        summary[kind] = dict(folds=folds, mean={k: over_folds(statistics.mean, v) for k, v in columns.items()},
                             sd={k: over_folds(sd, v) for k, v in columns.items()})
    task, names = next(iter(tasks))
    return summary, task, names


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
# 7. Command line

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


def save_features(path, features):
    write_file(path, lambda p: np.save(p, features.numpy()), f"features {tuple(features.shape)}, one row per video")


def test_checkpoint(args, model, run, env, names):
    """Multi-view test of a manifest: print the metrics, write predictions.csv (and confusion.png)."""
    samples = data.read_manifest(args.data_path, args.root_map, run["task"])
    loader = test_loader(samples, model.cfg, run["sampling_rate"], args, run["modality"])
    indices, scores, features = predict(model, loader, run["task"], env.device, lambda: autocast(args, env),
                                        features=bool(args.features))
    rows = [samples[i] for i in indices.tolist()]
    targets = torch.tensor([s.target for s in rows])
    output_dir = args.output_dir or Path(args.checkpoint).parent / f"eval-{Path(args.checkpoint).stem}"
    os.makedirs(output_dir, exist_ok=True)
    write_file(os.path.join(output_dir, "predictions.csv"),
               lambda p: write_predictions(p, [s.video for s in rows], targets, scores, run["task"], names),
               f"{len(samples)} videos, {run['task']}, {args.num_clips} clips x {args.num_crops} crops")
    if args.features:
        save_features(args.features, features)
    return report(scores, targets, run["task"], names, os.path.join(output_dir, "confusion.png"), str(args.checkpoint))


def classify_video(args, model, run, env, names):
    """Print the top classes with their probabilities (or the regression values) of one recording:
    --video (with --audio, or its own audio), or for an audio model --audio alone."""
    task, modality = run["task"], run["modality"]
    if not args.video and modality != "audio":
        raise ValueError(f"an {'audio-visual' if modality == 'av' else 'video'} model needs --video FILE")
    sample = data.Sample(args.video, args.audio, None, row=None)
    loader = test_loader([sample], model.cfg, run["sampling_rate"], args, modality)
    _, scores, features = predict(model, loader, task, env.device, lambda: autocast(args, env),
                                  features=bool(args.features))
    scores = scores[0]
    names = _names(names, len(scores))
    print(f"{args.video or args.audio}: {args.num_clips} clips x {args.num_crops} crops")
    if task == "classification":
        top = scores.argsort(descending=True)[:args.top_k].tolist()
        lines = _table([[names[c], f"{scores[c].item():.4f}"] for c in top])
    else:
        lines = _table([[name, f"{value:.4f}"] for name, value in zip(names, scores.tolist())])
    print("\n".join("  " + line for line in lines))
    if args.features:
        save_features(args.features, features)
    return scores


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
    parser.add_argument("--video", help="one video file or frame folder to classify (face crops: it does not crop)")
    parser.add_argument("--audio", help="its audio file (default: the video file's audio; a video model reads none, "
                                        "an audio model needs only this)")
    parser.add_argument("--class_names", nargs="+",
                        help="names of the classes, in index order (default: the checkpoint's)")
    parser.add_argument("--top_k", type=int, default=5, help="classes printed for --video")
    parser.add_argument("--features", metavar="OUT.npy", help="save the features the head sees, one row per video")
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
        if args.data_path and (args.video or args.audio):
            parser.error("--data_path TEST tests a manifest, --video/--audio one recording: give one of them")
        if not (args.data_path or args.video or args.audio):
            parser.error("--checkpoint needs --data_path TEST or --video FILE (an audio model: --audio FILE)")
    try:
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
        if env.device.type == "cuda":  # the run's dtype; on CPU only an explicit --dtype
            args.dtype = args.dtype or run.get("dtype")
        args.num_clips = args.num_clips or run.get("num_clips", 2)
        args.num_crops = args.num_crops or run.get("num_crops", 2)
        args.test_views = args.test_views or run.get("test_views", "authors")
        names = args.class_names or run.get("class_names")
        if args.video or args.audio:
            classify_video(args, model, run, env, names)
        else:
            test_checkpoint(args, model, run, env, names)
    except (ValueError, data.DataError) as e:  # a malformed file or a bad row: the message names it
        raise SystemExit(f"evaluate.py: {e}") from None
    except OSError as e:  # a file that is not there or cannot be read
        raise SystemExit(f"evaluate.py: {e.filename}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
