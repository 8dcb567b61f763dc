"""Supervised fine-tuning of HiCMAE (paper Sec. 3.4, Eq. 12; recipe Sec. 4.1).

    python finetune.py                                       # the built-in demo: demo data, small model, any device
    torchrun --nproc_per_node=4 finetune.py --data_path crema-d/train.csv --test_path crema-d/test.csv \\
        --init checkpoint-99.pth --output_dir runs/crema-d

Classification (soft-target cross-entropy with label smoothing, mixup / cutmix) or regression (mean
squared error) from audio, video or both; the training machinery is pretrain.py's, the multi-view test
evaluate.py's. The model is tested on --test_path every --test_every epochs; the best epoch (chosen on
the test split, as the authors do) is kept as best.pth and predictions-best.csv.
"""

import argparse
import math
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from evaluate import (CLASSIFICATION_KEYS, CLASSIFICATION_LABELS, REGRESSION_KEYS, compute_metrics, few_label_subsets,
                      format_metrics, metric_text, test_pass, write_predictions)
from model import HiCMAEClassifier, HiCMAEConfig, checkpoint_config, configure_optimizer, load_checkpoint
from pretrain import DEMO as PRETRAIN_DEMO
from pretrain import (DEMO_EPILOG, DEMO_MODEL, HelpFormatter, Logger, add_model_args, add_training_args, autocast,
                      broadcast_object, check_output_dir, close, demo_manifests, end_workers, make_loader, model_config,
                      parse_args, resume_path, save_checkpoint, setup, train)

# 1. Arguments: the authors' recipe as defaults (paper Sec. 4.1 and their fine-tuning scripts)

PRETRAIN_ONLY = ("decoder_dim", "decoder_heads", "decoder_depth", "skip_connections", "video_mask_ratio",
                 "audio_mask_ratio", "temperature", "hcmcl_weight", "normalize_target", "frame_diff_target")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=DEMO_EPILOG)
    add_model_args(parser, skip=PRETRAIN_ONLY, drop_path=0.1)
    add_training_args(parser, batch_size=14, epochs=100, base_lr=1e-3, min_lr=1e-6, betas=[0.9, 0.999],
                      output_dir="runs/finetune")
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--test_path", help="test manifest, tested after every epoch")
    g.add_argument("--modality", default="av", choices=["av", "audio", "video"], help="the streams the model sees")
    g.add_argument("--task", choices=["classification", "regression"], help="default: guessed from the manifest")
    g.add_argument("--num_outputs", type=int, help="classes or targets (default: from the manifests and class names)")
    g.add_argument("--class_names", nargs="+",
                   help="class (or target) names in index order (default: classes.txt beside the training manifest)")
    g.add_argument("--labels_per_class", type=int, default=0, help="train on this many clips per class (0: all)")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise learning-rate decay")
    g.add_argument("--test_every", type=int, default=1, help="test every N epochs (and after the last)")
    g.add_argument("--num_clips", type=int, default=2, help="test clips per video")
    g.add_argument("--num_crops", type=int, default=2, help="test crops per clip")
    g.add_argument("--test_views", default="authors", choices=data.TEST_VIEWS,
                   help="authors: frames resized to the model's size, aspect ignored; short_side: aspect kept")
    g = parser.add_argument_group("augmentation (classification: mixup, cutmix and smoothing)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="chance that a batch is mixed")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="chance of cutmix when both are on")
    g.add_argument("--mix_audio_as_authors", action="store_true", help="leave the audio unmixed, as the authors")
    g.add_argument("--crop_scale", type=float, nargs=2, default=[0.08, 1.0], help="random resized crop area range")
    g.add_argument("--rand_ops", type=int, default=4, help="RandAugment operations per clip (0: off)")
    g.add_argument("--rand_magnitude", type=int, default=7, help="RandAugment magnitude")
    g.add_argument("--erase_prob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--roll_gain", action=argparse.BooleanOptionalAction, default=True, help="audio roll and gain")
    g.add_argument("--freqm", type=int, default=0, help="audio frequency masking width (0: off)")
    g.add_argument("--timem", type=int, default=0, help="audio time masking width (0: off)")
    return parser


# 2. Data: the manifests say the task, the number of outputs and the class names

def read_data(args):
    """(train samples, test samples); fills in args.task, args.class_names and args.num_outputs."""
    args.task = args.task or data.guess_task(args.data_path)
    if args.task not in ("classification", "regression"):
        raise SystemExit(f"{args.data_path}: rows have no labels; fine-tuning needs a class index or "
                         "regression targets after <video> <audio>")
    train_samples = data.read_manifest(args.data_path, args.root_map, args.task)
    test_samples = data.read_manifest(args.test_path, args.root_map, args.task)
    set_outputs(args, train_samples + test_samples)
    if args.labels_per_class:  # few-label fine-tuning: a subset drawn with --seed (evaluate's probes draw alike)
        if args.task != "classification":
            raise SystemExit("--labels_per_class needs a classification task")
        keep = few_label_subsets(torch.tensor([s.target for s in train_samples]), args.labels_per_class, 1, args.seed)
        train_samples = [train_samples[i] for i in sorted(keep[0].tolist())]
    return train_samples, test_samples


def set_outputs(args, samples):
    """args.class_names (for classification: else classes.txt beside the training manifest) and args.num_outputs
    (else one per class name, or the largest class index + 1, or a regression target's length); a row's target
    that does not fit them stops in one line."""
    names = Path(args.data_path).parent / "classes.txt"
    if args.task == "classification" and not args.class_names and names.exists():
        args.class_names = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    if args.num_outputs is None:
        args.num_outputs = (len(args.class_names) if args.class_names else 1 + max(s.target for s in samples)
                            if args.task == "classification" else len(samples[0].target))
    if args.class_names and len(args.class_names) != args.num_outputs:
        raise SystemExit(f"{len(args.class_names)} class names for {args.num_outputs} outputs")
    for s in samples:
        if (s.target >= args.num_outputs if args.task == "classification" else len(s.target) != args.num_outputs):
            raise SystemExit(f"{s.row}: target {s.target} does not fit {args.num_outputs} outputs")


# 3. Model and optimiser: layer-wise learning-rate decay (paper Sec. 4.1)

def build_model(args):
    """The classifier of the flags over the --size preset; an authors' fine-tuned --init gives its geometry (the
    flags given still win). The weights are train()'s to load."""
    cfg = model_config(args)
    checkpoint = load_checkpoint(args.init) if args.init else None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):  # the authors'
        authors_cfg, run = checkpoint_config(checkpoint, **{f.name: getattr(args, f.name, None)
                                                            for f in fields(HiCMAEConfig)})
        if run["num_outputs"] is not None:
            cfg = authors_cfg
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return HiCMAEClassifier(cfg, args.modality, args.num_outputs)


# 4. Mixup and cutmix on both modalities with one coefficient, as timm's Mixup in 'batch' mode (the
# authors'): one lambda per batch, sample i mixed with sample B-1-i, drawn from torch's global generator.

def cutmix_box(height, width, lam):
    """(top, bottom, left, right): sides sqrt(1 - lam) of the frame's around a random pixel, clipped to it."""
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    return max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)


def mix(video, audio, target, args):
    """Mix a batch with its mirror: (video, audio, soft targets). Cutmix pastes the partner's box into every
    frame and blends audio and targets with the share of the frame kept; mixup blends all three with lam.
    --mix_audio_as_authors leaves the audio unmixed; a modality left out stays None. The batch is mixed with
    chance mixup_prob, by cutmix with chance mixup_switch_prob when both are on; lam ~ Beta(alpha, alpha)."""
    lam, use_cutmix = 1.0, False
    if (args.mixup > 0 or args.cutmix > 0) and torch.rand(()).item() < args.mixup_prob:
        use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or torch.rand(()).item() < args.mixup_switch_prob)
        alpha = args.cutmix if use_cutmix else args.mixup
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
    if use_cutmix and video is not None:
        top, bottom, left, right = cutmix_box(*video.shape[-2:], lam)
        video = video.clone()
        video[..., top:bottom, left:right] = video.flip(0)[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (video.shape[-2] * video.shape[-1])
    elif not use_cutmix and lam < 1 and video is not None:
        video = lam * video + (1 - lam) * video.flip(0)
    if lam < 1 and audio is not None and not args.mix_audio_as_authors:
        audio = lam * audio + (1 - lam) * audio.flip(0)
    one_hot = F.one_hot(target, args.num_outputs).float() * (1 - args.smoothing) + args.smoothing / args.num_outputs
    return video, audio, lam * one_hot + (1 - lam) * one_hot.flip(0)  # lam of its own target, 1 - lam of its partner's


# 5. Loss

def finetuning_loss_fn(args):
    def compute(model, batch):
        video, audio, target = batch.get("video"), batch.get("audio"), batch["target"]
        if args.task == "regression":
            return dict(loss=F.mse_loss(model(video, audio).float(), target.float()))
        video, audio, soft = mix(video, audio, target, args)
        log_probs = F.log_softmax(model(video, audio).float(), dim=-1)
        return dict(loss=-(soft * log_probs).sum(-1).mean())
    return compute


# 6. Testing after each epoch, the best checkpoint, predictions files

SELECTION_KEY = {"classification": "uar", "regression": "ccc"}  # what picks best.pth


def summary(metrics, task):
    if task == "classification":
        return " ".join(f"{CLASSIFICATION_LABELS[k]} {metric_text(metrics[k], task)}" for k in CLASSIFICATION_KEYS)
    return " ".join(f"{k.upper()} {metric_text(metrics[k], task)}" for k in REGRESSION_KEYS)


class Tester:
    """Tests the model (every rank its share), logs the metrics, writes predictions-last.csv and keeps the
    best epoch by SELECTION_KEY as best.pth and predictions-best.csv."""

    def __init__(self, args, env, raw_model, samples, log):
        self.args, self.env, self.model, self.log = args, env, raw_model, log
        dataset = data.FinetuneDataset(samples, raw_model.cfg, train=False, sampling_rate=args.sampling_rate,
                                       num_clips=args.num_clips, num_crops=args.num_crops, test_views=args.test_views,
                                       modality=args.modality)
        self.loader = make_loader(dataset, args, env, train=False)
        self.out = Path(args.output_dir)
        self.key = SELECTION_KEY[args.task]
        self.scalar_keys = CLASSIFICATION_KEYS if args.task == "classification" else REGRESSION_KEYS
        self.best, self.best_epoch = -math.inf, None
        self.tested, self.last = False, None  # tested: on every rank; last: the metrics, on rank 0
        best_path = self.out / "best.pth"
        if best_path.exists() and resume_path(args) is not None:  # train() will resume
            best = load_checkpoint(best_path)
            self.best, self.best_epoch = best["score"], best["epoch"]

    def __call__(self, epoch, select=True):
        rows, targets, scores, _ = test_pass(self.model, self.loader, self.args.task, self.env.device,
                                             lambda: autocast(self.args, self.env))
        self.tested = True
        error = self.record(epoch, rows, targets, scores, select) if self.env.master else None
        if broadcast_object(error, self.env):  # a failed save of best.pth stops every rank, in one line
            raise SystemExit(error)

    def record(self, epoch, rows, targets, scores, select):
        """Rank 0: metrics, predictions and best.pth. Returns the error of a failed save, else None."""
        args = self.args
        metrics = compute_metrics(scores, targets, args.task, args.class_names)
        write_predictions(self.out / "predictions-last.csv", [s.video for s in rows], targets, scores, args.task,
                          args.class_names)
        self.last = metrics
        score = metrics[self.key]
        if select and score > self.best:  # NaN never wins
            self.best, self.best_epoch = score, epoch
            try:
                save_checkpoint(self.out / "best.pth", dict(
                    model=self.model.state_dict(), args=vars(args), model_config=asdict(self.model.cfg),
                    epoch=epoch, score=score, metrics={k: metrics[k] for k in self.scalar_keys}))
            except OSError as e:
                return str(e)
            shutil.copyfile(self.out / "predictions-last.csv", self.out / "predictions-best.csv")
        best = (f"best {self.key.upper()} {metric_text(self.best, args.task)} (epoch {self.best_epoch})"
                if self.best_epoch is not None else "")
        self.log.record(dict(epoch=epoch, **{f"test_{k}": metrics[k] for k in self.scalar_keys},
                             best_epoch=self.best_epoch),
                        f"epoch {epoch} test | {summary(metrics, args.task)} | {best}")


# 7. The demo recipe and main

# For a 3-minute CPU run on 240 synthetic clips: a milder crop, no RandAugment, random erasing, mixup,
# cutmix or drop path; 16 epochs at a larger learning rate; a test every 4 epochs.
DEMO = dict(DEMO_MODEL, output_dir="runs/demo_finetune", batch_size=16, epochs=16, warmup_epochs=1,
            base_lr=0.1, min_lr=1e-4, drop_path=0.0, num_workers=2, log_every=5, save_every=1000, test_every=4,
            crop_scale=[0.5, 1.0], rand_ops=0, erase_prob=0.0, mixup=0.0, cutmix=0.0)
DEMO_INIT = Path(PRETRAIN_DEMO["output_dir"]) / "last.pth"  # what `python pretrain.py` leaves


def use_demo(args, env, log):
    """The demo data set, from the demo pre-training checkpoint if there is one (--init '' starts from scratch)."""
    args.data_path, args.test_path = demo_manifests(env)
    log(f"no --data_path: fine-tuning a small model on the demo data set ({args.data_path})")
    if args.init is None and DEMO_INIT.exists():
        args.init = str(DEMO_INIT)
    elif not DEMO_INIT.exists():
        log(f"no demo pre-training checkpoint ({DEMO_INIT}; `python pretrain.py` writes one)")
    log(f"starting from the pre-trained weights {args.init}" if args.init else "fine-tuning from scratch")


def main(argv=None):
    t0 = time.time()
    args = parse_args(build_parser(), argv, DEMO)
    env = setup(args)
    check_output_dir(args.output_dir)
    log = Logger(args.output_dir, env.master)
    if args.data_path is None:
        use_demo(args, env, log)
    if args.test_path is None:
        raise SystemExit("--test_path is required with --data_path (the model is tested after every epoch)")
    train_samples, test_samples = read_data(args)
    raw_model = build_model(args).to(env.device)
    cfg = raw_model.cfg
    torch.manual_seed(args.seed + env.rank)  # then a stream of its own per rank (drop path, mixup)
    log(f"{args.task}, {args.modality}, {args.num_outputs} outputs, {len(train_samples)} train and "
        f"{len(test_samples)} test videos; model: {cfg}")

    train_set = data.FinetuneDataset(
        train_samples, cfg, train=True, sampling_rate=args.sampling_rate, seed=args.seed, scale=tuple(args.crop_scale),
        rand_ops=args.rand_ops, rand_magnitude=args.rand_magnitude, erase_prob=args.erase_prob,
        roll_gain=args.roll_gain, freqm=args.freqm, timem=args.timem, modality=args.modality)
    loader = make_loader(train_set, args, env)
    # layer id i (model.layer_id) gets layer_decay^(L-1-i) of the learning rate
    optimizer = configure_optimizer(raw_model, 0.0, args.weight_decay, tuple(args.betas), args.layer_decay,
                                    env.device.type)
    tester = Tester(args, env, raw_model, test_samples, log)

    def on_epoch_end(epoch):
        if (epoch + 1) % args.test_every == 0 or epoch + 1 == args.epochs:
            tester(epoch)

    try:
        finished = train(args, env, raw_model, optimizer, loader, finetuning_loss_fn(args), log, on_epoch_end)
        if finished and not tester.tested:  # nothing was tested in this process (e.g. a finished run resumed)
            log("testing the model as it stands")
            tester(args.epochs - 1, select=False)
    finally:
        end_workers(loader, tester.loader)
    if env.master and finished:
        log(f"test metrics of the last epoch ({args.num_clips} clips x {args.num_crops} crops, "
            f"{len(test_samples)} videos):\n{format_metrics(tester.last, args.class_names)}")
        if tester.best_epoch is not None:
            log(f"best epoch {tester.best_epoch} by {tester.key.upper()} on the test split (as the authors "
                f"select): {metric_text(tester.best, args.task)}, in {args.output_dir}/best.pth")
        written = sorted(p.name for p in Path(args.output_dir).iterdir() if p.is_file() and p.stat().st_mtime >= t0)
        log(f"done in {time.time() - t0:.0f} s; written in {args.output_dir}/: {', '.join(written)}")
    close(env)
    return tester.last


if __name__ == "__main__":
    main()
