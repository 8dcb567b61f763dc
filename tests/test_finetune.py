"""finetune.py and the checkpoint half of evaluate.py: mixup and cutmix on both modalities, the
layer-decay groups, a short fine-tune, testing a checkpoint, predictions files, regression,
single-video inference and features. A tiny model on a few demo clips, CPU only."""

import argparse
import csv
import json
import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import finetune
import pretrain
from model import configure_optimizer, load_checkpoint
from tools.demo_data import DEMO_CLASSES, write_demo

TINY = ["--size", "tiny", "--img_size", "32", "--num_frames", "4", "--sampling_rate", "2", "--audio_frames", "32",
        "--mel_bins", "32", "--dim", "32", "--heads", "2", "--depth", "3", "--inter_layers", "0", "1", "2",
        "--fusion_depth", "1", "--num_workers", "0", "--device", "cpu"]
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
    train, test = write_demo(tmp_path_factory.mktemp("demo"), num_train=16, num_test=8)
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
# Layer-wise learning-rate decay (paper Sec. 4.1, the authors' code): layer id i gets 0.75^(Ns + Nf + 1 - i)

LAYER_IDS = [  # name prefix -> layer id for depth 3 and fusion depth 1, written out by hand
    ("video_encoder.patch_embed.", 0), ("audio_encoder.patch_embed.", 0),
    ("video_encoder.blocks.0.", 1), ("audio_encoder.blocks.0.", 1),
    ("video_encoder.blocks.1.", 2), ("audio_encoder.blocks.1.", 2),
    ("video_encoder.blocks.2.", 3), ("audio_encoder.blocks.2.", 3),
    ("fusion.video_blocks.0.", 4), ("fusion.audio_blocks.0.", 4),
]


def expected_layer_id(name):
    return next((i for prefix, i in LAYER_IDS if name.startswith(prefix)), 5)  # the rest: norms, weights, head


def test_layer_decay_groups():
    args = args_for(*TINY)
    model = finetune.build_model(args)
    optimizer = configure_optimizer(model, 0.0, args.weight_decay, tuple(args.betas), args.layer_decay)  # as main
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = [name for name, _ in model.named_parameters()]
    assert len(group_of) == len(names)
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        assert group["lr_scale"] == pytest.approx(0.75 ** (5 - expected_layer_id(name))), name
        assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
    scale = {name: group_of[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    assert scale["video_encoder.patch_embed.weight"] == pytest.approx(0.75 ** 5)
    assert scale["audio_encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.75 ** 3)
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
    assert task == "classification" and names == list(DEMO_CLASSES) and len(targets) == 8
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


def test_single_video_probabilities(finetuned, media, capsys):
    """A recording shorter than two windows (here 16 ticks: 4 frames 2 apart, twice) is answered as a test set's
    clip is: its top classes."""
    out, _ = finetuned
    video = media.video("short.mp4", 12, audio=("aac", 16000, media.tone(0.5, 16000, amplitudes=(0.5,))))
    evaluate.main(["--checkpoint", str(out / "best.pth"), "--video", video, "--face_crop", "off", "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(name for name, _ in rows) == sorted(DEMO_CLASSES)
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


def test_a_pretraining_checkpoint_initialises_fine_tuning(demo, tmp_path, capsys):
    """pretrain.py's last.pth (with decoders and their flags) into finetune.py, which has neither: with lr 0
    the fine-tuned encoders are exactly the pre-trained ones."""
    pretrain.main(TINY + ["--decoder_dim", "16", "--decoder_heads", "2", "--video_mask_ratio", "0.5",
                          "--audio_mask_ratio", "0.5", "--visualize_every", "0", "--batch_size", "8", "--epochs", "1",
                          "--data_path", demo["train"], "--output_dir", str(tmp_path / "pre")])
    finetune.main(TINY + ["--init", str(tmp_path / "pre" / "last.pth"), "--base_lr", "0", "--min_lr", "0",
                          "--warmup_lr", "0", "--batch_size", "8", "--epochs", "1", "--num_clips", "1", "--num_crops",
                          "1", "--data_path", demo["train"], "--test_path", demo["test"],
                          "--output_dir", str(tmp_path / "ft")])
    assert f"initialised from {tmp_path / 'pre' / 'last.pth'}" in capsys.readouterr().out
    pre = load_checkpoint(tmp_path / "pre" / "last.pth")["model"]
    ft = load_checkpoint(tmp_path / "ft" / "last.pth")["model"]
    encoders = [k for k in ft if k.startswith(("video_encoder.", "audio_encoder.", "fusion."))]
    assert encoders and all(torch.equal(ft[k], pre[k]) for k in encoders)
    model, _ = evaluate.load_finetuned(str(tmp_path / "ft" / "last.pth"))  # the fine-tuned checkpoint rebuilds
    assert model.cfg == finetune.build_model(args_for(*TINY)).cfg


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


# ----------------------------------------------------------------------------------------------
# What a newcomer meets: one-modality inference, messages, --help, defaults, outputs, reruns

def random_checkpoint(path, modality):
    """A finetune.py checkpoint of the tiny model at random initialisation, 4 demo classes."""
    args = args_for(*TINY, "--modality", modality)
    args.class_names = list(DEMO_CLASSES)
    model = finetune.build_model(args)
    torch.save(dict(model=model.state_dict(), model_config=asdict(model.cfg), args=vars(args)), path)
    return str(path)


def probabilities(out):
    return [float(line.split()[1]) for line in out.splitlines()[1:]]


def test_one_modality_models_need_only_their_stream(media, tmp_path, capsys):
    silent = media.video("silent.mp4", 12)  # recordings shorter than two windows of the tiny model: their test views
    faces = media.frames("faces", 12)
    wav = media.audio("voice.wav", 16000, media.tone(0.5, 16000, amplitudes=(0.5,)))
    video, audio = random_checkpoint(tmp_path / "video.pth", "video"), random_checkpoint(tmp_path / "audio.pth", "audio")
    found = []
    for flags in (["--checkpoint", video, "--video", silent], ["--checkpoint", video, "--video", faces],
                  ["--checkpoint", audio, "--audio", wav], ["--checkpoint", audio, "--video", wav]):
        evaluate.main(["--face_crop", "off", "--output_dir", str(tmp_path / "out")] + flags + ["--device", "cpu"])
        out = capsys.readouterr().out
        assert out.startswith(f"{flags[-1]}: 2 clips x 2 crops"), out
        found.append(probabilities(out))
        assert len(found[-1]) == 4 and math.isclose(sum(found[-1]), 1.0, abs_tol=5e-4)
    assert found[2] == found[3]  # the same recording, as --audio or as --video
    args = args_for(*TINY, "--modality", "video", "--output_dir", str(tmp_path))  # fine-tuning on silent videos
    rows = [data.Sample(silent, silent, 0, "m:1")]
    train_set = data.FinetuneDataset(rows, finetune.build_model(args).cfg, train=True, sampling_rate=args.sampling_rate,
                                     modality="video")
    assert train_set[0]["video"].shape == (3, 4, 32, 32)
    tester = finetune.Tester(args, pretrain.Env(0, 0, 1, torch.device("cpu"), False), finetune.build_model(args), rows,
                             print)
    assert tester.loader.dataset[0]["video"].shape == (4, 3, 4, 32, 32)  # 2 clips x 2 crops


def test_video_mode_errors_name_the_flag_and_the_path_once(media, tmp_path, capsys):
    faces, silent = media.frames("faces", 30), media.video("silent.mp4", 30)
    wav = media.audio("voice.wav", 16000, media.tone(3.0, 16000, amplitudes=(0.5,)))
    av = random_checkpoint(tmp_path / "av.pth", "av")
    for path, reason in ((faces, "a frame folder has no audio"), (silent, "no audio stream")):
        assert evaluate.main(["--checkpoint", av, "--video", path, "--face_crop", "off", "--device", "cpu"]) == 1
        message = capsys.readouterr().err
        assert message.startswith(f"evaluate.py: {path}: {reason}") and message.count(path) == 1, message
        assert "--audio" in message
    with pytest.raises(SystemExit, match="an audio-visual model needs --video FILE"):
        evaluate.main(["--checkpoint", av, "--audio", wav, "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:  # a usage error, naming both flags
        evaluate.main(["--checkpoint", av, "--video", silent, "--data_path", "test.csv"])
    assert exit_.value.code == 2 and "--data_path TEST tests a manifest, --video" in capsys.readouterr().err
    for parse in (finetune.build_parser().parse_args, evaluate.build_parser().parse_args):
        with pytest.raises(SystemExit) as exit_:
            parse(["--checkpoint", av, "--root_map", "/old/path"][2 if parse.__self__.prog != "evaluate.py" else 0:])
        assert exit_.value.code == 2 and "a root map is OLD=NEW" in capsys.readouterr().err


def test_help_shows_the_values_each_stage_uses(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # the lines unwrapped
    assert "--drop_path DROP_PATH default 0.1 " in text
    for flag in finetune.PRETRAIN_ONLY:  # the decoders and the pre-training objective: not offered here
        assert f"--{flag}" not in text, flag
    assert "--size {tiny,small,base} HiCMAE-T/S/B (default base)" in text
    assert "--dim DIM default by --size: tiny 256, small 384, base 512" in text
    for parser in (finetune.build_parser(), pretrain.build_parser(), evaluate.build_parser()):
        for action in parser._actions:  # every flag with a default says it
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                formatter = parser._get_formatter()
                formatter.add_argument(action)
                assert "default" in formatter.format_help(), (parser.prog, action.dest)


def test_loader_workers_default_to_the_cores_at_hand():
    cores = len(os.sched_getaffinity(0))
    assert finetune.build_parser().parse_args([]).num_workers == min(8, cores)
    assert evaluate.build_parser().parse_args(["--predictions", "p.csv"]).num_workers == min(8, cores)


def test_every_file_written_is_named_and_a_rerun_says_what_it_replaced(demo, tmp_path, capsys):
    video = random_checkpoint(tmp_path / "video.pth", "video")
    out = tmp_path / "eval-video"
    command = ["--checkpoint", video, "--data_path", demo["test"], "--num_workers", "0", "--device", "cpu",
               "--num_clips", "1", "--num_crops", "1"]
    evaluate.main(command)
    printed = capsys.readouterr().out
    for name in ("predictions.csv", "confusion.png"):
        assert f"wrote {out / name}: " in printed
    evaluate.main(command + ["--features", str(tmp_path / "features.npy")])
    printed = capsys.readouterr().out
    for name in ("predictions.csv", "confusion.png"):
        assert f"replaced {out / name}: " in printed
    assert f"wrote {tmp_path / 'features.npy'}: features (8, 32)" in printed
    with Image.open(out / "confusion.png") as image:
        assert image.height > image.width  # titled


def test_first_lines_epochs_units_and_a_rerun_of_another_configuration(demo, tmp_path, capsys):
    out = tmp_path / "run"
    common = TINY + PLAIN + ["--data_path", demo["train"], "--test_path", demo["test"], "--output_dir", str(out),
                             "--log_every", "100", "--num_clips", "1", "--num_crops", "1"]
    finetune.main(common + ["--epochs", "2", "--warmup_epochs", "2", "--test_every", "2"])  # 2 steps of 8 clips per epoch
    printed = capsys.readouterr().out
    assert "note: the warm-up (2 epochs, 4 steps) is not shorter than the run (4 steps)" in printed
    assert "note: a total batch of 8 scales the peak learning rate down to 8/256 of --base_lr" in printed
    assert [row["step"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in row] == [2, 4]  # every epoch logs its loss, though shorter than --log_every
    test_line = next(line for line in printed.splitlines() if line.startswith("epoch 1 test |"))
    assert re.search(r"\| best UAR \d+\.\d\d% \(epoch 1\)$", test_line), test_line  # one unit: percent
    assert re.search(r"best epoch 1 by UAR on the test split .*: \d+\.\d\d%, in ", printed)
    assert re.search(r"written in \S+/: best\.pth, checkpoint-001\.pth, last\.pth, log\.jsonl, "
                     r"predictions-best\.csv, predictions-last\.csv$", printed, re.M)  # every file the run wrote
    with pytest.raises(SystemExit) as exit_:  # the folder holds an audio-visual run
        finetune.main(common + ["--epochs", "2", "--modality", "audio"])
    message = str(exit_.value)
    assert message.startswith(f"{out / 'last.pth'} holds a run of another configuration (") and "\n" not in message
    assert "modality av there, audio here" in message and "--resume none" in message
    capsys.readouterr()
    finetune.main(common + ["--epochs", "1", "--modality", "audio", "--resume", "none"])
    assert "--resume none: starting afresh" in capsys.readouterr().out
    finetune.main(common + ["--epochs", "2", "--modality", "audio"])
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'last.pth'} at the start of epoch 1 (step 2)" in printed
    assert "epoch 1 step 4/4" in printed and (out / "checkpoint-001.pth").exists()


def test_a_failed_save_of_best_pth_stops_in_one_line(demo, tmp_path):
    out = tmp_path / "run"
    (out / "best.pth").mkdir(parents=True)  # a folder in its place: the rename onto it fails
    (out / "best.pth" / "keep").write_text("")
    command = TINY + PLAIN + ["--data_path", demo["train"], "--test_path", demo["test"], "--output_dir", str(out),
                              "--num_clips", "1", "--num_crops", "1", "--epochs", "1"]
    with pytest.raises(SystemExit) as exit_:
        finetune.main(command)
    message = str(exit_.value)
    assert message.startswith(f"could not save {out / 'best.pth'}: ") and "MB needed" in message, message
    assert "\n" not in message and not (out / "best.pth.tmp").exists()
