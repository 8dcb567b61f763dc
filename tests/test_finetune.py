"""finetune.py and the checkpoint half of evaluate.py: mixup and cutmix on both modalities, the
layer-decay groups, a short fine-tune, testing a checkpoint, predictions files, regression,
single-video inference and features. A tiny model on a few demo clips, CPU only."""

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

import data
import evaluate
import finetune

TINY = ["--size", "tiny", "--img_size", "32", "--num_frames", "4", "--sampling_rate", "2", "--audio_frames", "32",
        "--mel_bins", "32", "--dim", "32", "--heads", "2", "--depth", "2", "--inter_layers", "1",
        "--decoder_depth", "2", "--fusion_depth", "1", "--decoder_dim", "16", "--decoder_heads", "2",
        "--num_workers", "0", "--device", "cpu"]
# No augmentation, so that 20 short epochs are enough to fit the training clips.
PLAIN = ["--batch_size", "8", "--warmup_epochs", "1", "--base_lr", "0.1", "--min_lr", "0.001", "--drop_path", "0",
         "--rand_ops", "0", "--erase_prob", "0", "--mixup", "0", "--cutmix", "0", "--crop_scale", "1", "1",
         "--no-roll_gain", "--log_every", "2"]
METRIC_LINE = re.compile(r"^(UAR|WAR|weighted F1|macro F1|AUC|PCC|CCC|MSE)\s")


def args_for(*flags):
    """Fine-tuning arguments as the parser makes them (without the demo defaults), 4 classes."""
    args = finetune.build_parser().parse_args(list(flags))
    args.num_outputs, args.task = 4, "classification"
    return args


def metric_lines(text):
    return [line.split() for line in text.splitlines() if METRIC_LINE.match(line)]


def log_losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train, test = data.write_demo(tmp_path_factory.mktemp("demo"), num_train=16, num_test=8)
    return dict(train=train, test=test)


@pytest.fixture(scope="module")
def finetuned(demo, tmp_path_factory):
    """A classifier fitted to the 16 training clips, tested on them: a learnable set."""
    out = tmp_path_factory.mktemp("finetune")
    metrics = finetune.main(TINY + PLAIN + ["--data_path", demo["train"], "--test_path", demo["train"],
                                            "--epochs", "20", "--test_every", "10", "--output_dir", str(out)])
    return out, metrics


# ----------------------------------------------------------------------------------------------
# Mixup and cutmix

def numbered_batch(batch_size=6, size=16):
    """Sample i: every video value i + 1, every audio value 10 (i + 1); targets 0 1 2 3 0 1."""
    ids = torch.arange(1, batch_size + 1, dtype=torch.float32)
    video = ids.view(-1, 1, 1, 1, 1).expand(-1, 3, 2, size, size).clone()
    audio = 10 * ids.view(-1, 1, 1, 1).expand(-1, 1, 8, 4).clone()
    return video, audio, torch.arange(batch_size) % 4


def expected_targets(target, lam, smoothing=0.1, num_classes=4):
    one_hot = torch.nn.functional.one_hot(target, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


def test_mixup_mixes_video_audio_and_targets_with_one_lambda_and_partner():
    video, audio, target = numbered_batch()
    torch.manual_seed(0)
    mixed_video, mixed_audio, soft = finetune.mix(video, audio, target, args_for("--mixup", "0.8", "--cutmix", "0"))
    own, partner = torch.arange(1.0, 7.0), torch.arange(6.0, 0.0, -1)  # sample i is mixed with sample 5 - i
    lam = (mixed_video[:, 0, 0, 0, 0] - partner) / (own - partner)
    assert 0 < lam[0] < 1 and torch.allclose(lam, lam[0].expand(6), atol=1e-5)
    assert torch.allclose(mixed_video, (lam[0] * own + (1 - lam[0]) * partner).view(-1, 1, 1, 1, 1).expand_as(video))
    assert torch.allclose(mixed_audio, 10 * (lam[0] * own + (1 - lam[0]) * partner).view(-1, 1, 1, 1).expand_as(audio))
    assert torch.allclose(soft, expected_targets(target, lam[0]), atol=1e-5)
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_cutmix_uses_the_box_area_for_audio_and_targets():
    video, audio, target = numbered_batch()
    args = args_for("--mixup", "0", "--cutmix", "1.0")
    for seed in range(20):  # the first seed whose box is neither empty nor the whole frame
        torch.manual_seed(seed)
        mixed_video, mixed_audio, soft = finetune.mix(video, audio, target, args)
        pasted = mixed_video != video
        if 0 < pasted.float().mean() < 1:
            break
    own, partner = torch.arange(1.0, 7.0), torch.arange(6.0, 0.0, -1)
    # the same box in every sample, channel and frame, filled with the partner's values
    assert (pasted == pasted[0, 0, 0]).all()
    assert torch.equal(mixed_video[pasted], partner.view(-1, 1, 1, 1, 1).expand_as(video)[pasted])
    lam = 1 - pasted[0, 0, 0].float().mean()  # the share of the frame left as it was
    assert torch.allclose(mixed_audio, 10 * (lam * own + (1 - lam) * partner).view(-1, 1, 1, 1).expand_as(audio))
    assert torch.allclose(soft, expected_targets(target, lam), atol=1e-5)
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_authors_mode_leaves_the_audio_unmixed():
    video, audio, target = numbered_batch()
    torch.manual_seed(0)
    mixed_video, mixed_audio, soft = finetune.mix(video, audio, target,
                                                  args_for("--mixup", "0.8", "--cutmix", "0", "--mix_audio_as_authors"))
    assert not torch.equal(mixed_video, video) and torch.equal(mixed_audio, audio)
    assert not torch.allclose(soft, expected_targets(target, 1.0))


def test_no_mixing_gives_smoothed_one_hot_targets():
    video, audio, target = numbered_batch()
    mixed_video, mixed_audio, soft = finetune.mix(video, audio, target, args_for("--mixup_prob", "0"))
    assert torch.equal(mixed_video, video) and torch.equal(mixed_audio, audio)
    assert torch.allclose(soft, expected_targets(target, 1.0))
    assert soft[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])


# ----------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (SPEC 5): layer id i gets 0.75^(Ns + Nf + 1 - i)

LAYER_IDS = [  # name prefix -> layer id for depth 2 and fusion depth 1, written out from SPEC 5
    ("video_encoder.patch_embed.", 0), ("audio_encoder.patch_embed.", 0),
    ("video_encoder.blocks.0.", 1), ("audio_encoder.blocks.0.", 1),
    ("video_encoder.blocks.1.", 2), ("audio_encoder.blocks.1.", 2),
    ("fusion.video_blocks.0.", 3), ("fusion.audio_blocks.0.", 3),
]


def expected_layer_id(name):
    return next((i for prefix, i in LAYER_IDS if name.startswith(prefix)), 4)  # the rest: norms, weights, head


def test_layer_decay_groups():
    args = args_for(*TINY)
    model = finetune.build_model(args)
    optimizer = finetune.build_optimizer(model, args, "cpu")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = [name for name, _ in model.named_parameters()]
    assert len(group_of) == len(names)
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        assert group["lr_scale"] == pytest.approx(0.75 ** (4 - expected_layer_id(name))), name
        assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
    scale = {name: group_of[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    assert scale["video_encoder.patch_embed.weight"] == pytest.approx(0.75 ** 4)
    assert scale["audio_encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.75 ** 2)
    assert scale["fusion.audio_blocks.0.cross_attn.q.weight"] == pytest.approx(0.75)
    assert scale["head.weight"] == scale["fc_norm.weight"] == scale["video_layer_weights"] == 1.0


def test_recipe_defaults():
    args = finetune.build_parser().parse_args([])
    assert (args.batch_size, args.epochs, args.base_lr, args.min_lr, args.warmup_epochs) == (14, 100, 1e-3, 1e-6, 5)
    assert (args.betas, args.weight_decay, args.layer_decay, args.drop_path) == ([0.9, 0.999], 0.05, 0.75, 0.1)
    assert (args.smoothing, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob) == (0.1, 0.8, 1.0, 1.0, 0.5)
    assert (args.num_clips, args.num_crops, args.mix_audio_as_authors, args.test_views) == (2, 2, False, "authors")


# ----------------------------------------------------------------------------------------------
# Multi-view testing (evaluate.predict, which finetune.py tests with every epoch)

class RandomViews(torch.utils.data.Dataset):
    """Test items of random tensors: V = 3 views of a (3, 4, 32, 32) clip and a (1, 32, 32) spectrogram."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.video, self.audio = torch.randn(n, 3, 3, 4, 32, 32, generator=g), torch.randn(n, 3, 1, 32, 32, generator=g)

    def __len__(self):
        return len(self.video)

    def __getitem__(self, i):
        return dict(video=self.video[i], audio=self.audio[i], index=i)


def test_predict_averages_the_views_and_drops_padding_repeats(tmp_path):
    model = finetune.build_model(args_for(*TINY)).eval()
    dataset = RandomViews(5)
    padded = [3, 4, 0, 1, 2, 3]  # DistributedSampler pads a rank's share with repeats
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=padded)
    indices, scores, features = evaluate.predict(model, loader, "classification", "cpu", features=True)
    assert indices.tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        logits = model(dataset.video.flatten(0, 1), dataset.audio.flatten(0, 1)).view(5, 3, 4)
        feature = model.forward_features(dataset.video.flatten(0, 1), dataset.audio.flatten(0, 1)).view(5, 3, -1)
    assert torch.allclose(scores, logits.softmax(-1).mean(1), atol=1e-5)
    assert torch.allclose(features, feature.mean(1), atol=1e-5) and features.shape == (5, 4 * 32)
    # the same through the gather of a (one-process) process group
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gathered = evaluate.predict(model, loader, "classification", "cpu", features=True)
    finally:
        torch.distributed.destroy_process_group()
    assert gathered[0].tolist() == [0, 1, 2, 3, 4] and torch.allclose(gathered[1], scores)


# ----------------------------------------------------------------------------------------------
# A short fine-tune, then evaluate.py on its checkpoints

def test_short_finetune_fits_the_training_clips(finetuned):
    out, metrics = finetuned
    # AUC 0.8 over 16 clips and 4 classes is about five standard deviations above chance (0.5)
    assert metrics["auc"] >= 0.8 and metrics["war"] > 0.25
    losses = log_losses(out)
    assert losses[-1] < 0.8 * losses[0]
    for name in ("best.pth", "last.pth", "predictions-last.csv", "predictions-best.csv"):
        assert (out / name).exists(), name


def test_checkpoint_then_predictions_file_give_the_same_numbers(finetuned, demo, tmp_path, capsys):
    out, _ = finetuned
    evaluate.main(["--checkpoint", str(out / "last.pth"), "--data_path", demo["test"], "--output_dir", str(tmp_path),
                   "--num_workers", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert (tmp_path / "confusion.png").exists()
    evaluate.main(["--predictions", str(tmp_path / "predictions.csv")])
    recomputed = capsys.readouterr().out
    assert len(metric_lines(printed)) == 5 and metric_lines(printed) == metric_lines(recomputed)
    assert "per-class recall  neutral" in printed  # the class names travel in the checkpoint
    _, targets, scores, task, names = evaluate.read_predictions(tmp_path / "predictions.csv")
    assert task == "classification" and names == list(data.DEMO_CLASSES) and len(targets) == 8
    assert torch.allclose(scores.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-5)


def test_checkpoint_reproduces_the_predictions_of_training(finetuned, demo, tmp_path, capsys):
    out, _ = finetuned
    evaluate.main(["--checkpoint", str(out / "last.pth"), "--data_path", demo["train"], "--output_dir", str(tmp_path),
                   "--num_workers", "0", "--device", "cpu"])
    paths, targets, scores, _, _ = evaluate.read_predictions(tmp_path / "predictions.csv")
    paths_t, targets_t, scores_t, _, _ = evaluate.read_predictions(out / "predictions-last.csv")
    assert paths == paths_t and torch.equal(targets, targets_t)
    assert torch.allclose(scores, scores_t, atol=1e-6)


def test_features_one_row_per_video(finetuned, demo, tmp_path, capsys):
    out, _ = finetuned
    evaluate.main(["--checkpoint", str(out / "best.pth"), "--data_path", demo["test"], "--output_dir", str(tmp_path),
                   "--features", str(tmp_path / "features.npy"), "--num_workers", "0", "--device", "cpu"])
    features = np.load(tmp_path / "features.npy")
    assert features.shape == (8, 4 * 32) and np.isfinite(features).all()  # [video, audio, fused video, fused audio]


def test_single_video_probabilities(finetuned, demo, capsys):
    out, _ = finetuned
    video = data.read_manifest(demo["test"], task="classification")[0].video
    evaluate.main(["--checkpoint", str(out / "best.pth"), "--video", video, "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(name for name, _ in rows) == sorted(data.DEMO_CLASSES)
    probabilities = [float(p) for _, p in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert math.isclose(sum(probabilities), 1.0, abs_tol=5e-4)


# ----------------------------------------------------------------------------------------------
# Regression

def test_regression_run(demo, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    manifest = tmp_path / "av.csv"  # arousal, valence, dominance made up for the demo clips
    rows = [f"{s.video} {s.audio} " + " ".join(f"{v:.3f}" for v in torch.rand(3, generator=g).tolist())
            for s in data.read_manifest(demo["train"], task="classification")[:8]]
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    metrics = finetune.main(TINY + PLAIN + ["--data_path", str(manifest), "--test_path", str(manifest), "--epochs", "1",
                                            "--class_names", "arousal", "valence", "dominance",
                                            "--output_dir", str(out)])
    assert {"pcc", "ccc", "mse"} <= set(metrics) and len(metrics["per_dim_ccc"]) == 3
    with open(out / "predictions-last.csv") as f:
        header = next(csv.reader(f))
    assert header == ["path", "target_arousal", "target_valence", "target_dominance",
                      "pred_arousal", "pred_valence", "pred_dominance"]
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(out / "last.pth"), "--data_path", str(manifest), "--output_dir", str(tmp_path),
                   "--num_workers", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    evaluate.main(["--predictions", str(out / "predictions-last.csv")])
    assert [row[0] for row in metric_lines(printed)] == ["PCC", "CCC", "MSE"]
    assert metric_lines(printed) == metric_lines(capsys.readouterr().out)


def test_labels_per_class_keeps_that_many_clips_of_each_class(demo):
    args = finetune.build_parser().parse_args(TINY + ["--data_path", demo["train"], "--test_path", demo["test"],
                                                     "--labels_per_class", "2"])
    train, test = finetune.read_data(args)
    assert sorted(s.target for s in train) == [0, 0, 1, 1, 2, 2, 3, 3] and len(test) == 8
    rows = [int(s.row.rsplit(":", 1)[1]) for s in train]
    assert rows == sorted(rows)  # in manifest order
    other = finetune.build_parser().parse_args(TINY + ["--data_path", demo["train"], "--test_path", demo["test"],
                                                      "--labels_per_class", "2", "--seed", "1"])
    assert [s.row for s in finetune.read_data(other)[0]] != [s.row for s in train]  # the subset follows --seed
