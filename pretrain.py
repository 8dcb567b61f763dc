"""Self-supervised pre-training of HiCMAE (paper Sec. 3; recipe Sec. 4.1 and SPEC section 5).

    python pretrain.py                                       # the built-in demo: demo data, small model, any device
    torchrun --nproc_per_node=4 pretrain.py --data_path vox2_dev.csv --output_dir runs/hicmae_b
    python pretrain.py --benchmark --size base --batch_size 40 --compile   # training steps on random tensors

One process per GPU under torchrun (NCCL on GPUs, gloo on CPU) with plain DistributedDataParallel;
without torchrun the same script runs as one process. This file also owns the training machinery
that finetune.py imports: arguments, distributed set-up, schedule, the training loop, checkpoints, logs.
"""

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image

import data
from model import (IMAGENET_MEAN, IMAGENET_STD, HiCMAE, HiCMAEConfig, check_masks, configure_optimizer, count_macs,
                   load_checkpoint, load_weights, make_config, model_state, patchify_audio, patchify_video,
                   pretrain_loss, unpatchify_audio, unpatchify_video)


# ----------------------------------------------------------------------------------------------
# 1. Arguments (shared with finetune.py)

def add_model_args(parser):
    """One flag per field of HiCMAEConfig; unset flags take the --size preset, then the paper's value."""
    group = parser.add_argument_group("model (defaults: the --size preset, then the paper's values)")
    group.add_argument("--size", default="base", choices=["tiny", "small", "base"], help="HiCMAE-T/S/B")
    for f in fields(HiCMAEConfig):
        if f.type is bool or isinstance(f.default, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"default {f.default}")
        elif f.name == "inter_layers":
            group.add_argument("--inter_layers", type=int, nargs="+", default=None,
                               help=f"selected encoder layers, 0-based (default {' '.join(map(str, f.default))})")
        else:
            group.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default {f.default}")


def model_config(args):
    overrides = {f.name: getattr(args, f.name) for f in fields(HiCMAEConfig) if getattr(args, f.name) is not None}
    return make_config(args.size, **overrides)


def add_training_args(parser, **defaults):
    """Data, optimisation, precision, checkpoint and logging flags; `defaults` holds the stage's recipe."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="manifest in the authors' format (none: the demo data set)")
    g.add_argument("--root_map", action="append", default=[], metavar="OLD=NEW", help="rewrite a path prefix")
    g.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a clip")
    g.add_argument("--num_workers", type=int, default=8)
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="stop once more than this share of the samples seen could not be decoded")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=defaults["batch_size"], help="clips per GPU per micro-step")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--epochs", type=int, default=defaults["epochs"])
    g.add_argument("--warmup_epochs", type=float, default=5)
    g.add_argument("--base_lr", type=float, default=defaults["base_lr"], help="lr = base_lr * total batch / 256")
    g.add_argument("--min_lr", type=float, default=defaults["min_lr"], help="end of the cosine, scaled like lr")
    g.add_argument("--warmup_lr", type=float, default=1e-6, help="start of the warm-up, scaled like lr")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=defaults["betas"])
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast type (default: bf16 on cuda, fp32 on cpu; bf16 on cpu when asked; fp16 cuda only)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (and the pre-training loss), each one graph (fullgraph=True)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output_dir", default=defaults["output_dir"])
    g.add_argument("--resume", default=None, help="checkpoint to resume (default: output_dir/last.pth if any)")
    g.add_argument("--init", default=None, help="start from these weights only (ours or the authors')")
    g.add_argument("--save_every", type=int, default=10, help="keep a checkpoint every N epochs")
    g.add_argument("--save_every_steps", type=int, default=0, help="also save last.pth every N steps")
    g.add_argument("--stop_at_step", type=int, default=0,
                   help="save and stop after this many steps, the schedule unchanged (to split a run into jobs)")
    g.add_argument("--log_every", type=int, default=20)


def parse_args(parser, argv, demo_defaults):
    """Parse; without --data_path the demo recipe replaces the defaults (explicit flags still win)."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--data_path" or a.startswith("--data_path=") for a in argv) and "--benchmark" not in argv:
        parser.set_defaults(**demo_defaults)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# 2. Distributed set-up

@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    ddp: bool

    @property
    def master(self):
        return self.rank == 0


def setup(args):
    """One process per GPU under torchrun (RANK set), else a single process."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    else:
        rank, local_rank, world_size, device = 0, 0, 1, torch.device(args.device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU, which set_device needs named
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the cores left to this process after its loader workers: more threads than cores spin and crawl
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, per_process - args.num_workers))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(rank, local_rank, world_size, device, ddp)


def all_mean(values, env):
    """Average a 1-D tensor over the ranks."""
    if env.ddp:
        dist.all_reduce(values)
        values /= env.world_size
    return values


def amp_dtype(args, env):
    """--dtype, else bf16 on cuda and fp32 on cpu (the CPU default keeps the demo and the tests fast and exact)."""
    return args.dtype or ("bf16" if env.device.type == "cuda" else "fp32")


def autocast(args, env):
    dtype = amp_dtype(args, env)
    if dtype == "fp32":
        return nullcontext()
    if dtype == "fp16" and env.device.type != "cuda":
        raise ValueError("--dtype fp16 needs a GPU (its gradient scaler is CUDA's); use bf16 or fp32 on cpu")
    return torch.autocast(env.device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------
# 3. Learning-rate schedule: per-step linear warm-up, then cosine

def scaled(args, env, value):
    return value * args.batch_size * args.accum_steps * env.world_size / 256


def lr_at(step, total_steps, warmup_steps, lr, min_lr, warmup_lr):
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def capture_rng(env):
    """Every rank's RNG states (CPU, CUDA, Python), gathered so that rank 0 can save them."""
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                 cuda=torch.cuda.get_rng_state() if env.device.type == "cuda" else None)
    if not env.ddp:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, env):
    if len(states) != env.world_size:
        print(f"note: checkpoint RNG states are from {len(states)} processes, this run has {env.world_size}: "
              "random streams restart")
        return
    state = states[env.rank]
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Progress:
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimiser steps done in the whole run


def start_state(args, env, raw_model, optimizer, scaler, log):
    """Resume (--resume, else output_dir/last.pth if present), or load --init weights, or start fresh."""
    path = args.resume or (Path(args.output_dir) / "last.pth")
    if args.resume or Path(path).exists():
        ckpt = load_checkpoint(path)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], env)
        progress = Progress(**ckpt["progress"])
        log(f"resumed from {path}: epoch {progress.epoch}, step {progress.step}")
        return progress
    if args.init:
        load_weights(raw_model, model_state(load_checkpoint(args.init)), log=log)
        log(f"initialised from {args.init}")
    return Progress()


# ----------------------------------------------------------------------------------------------
# 5. Logging: one line per interval on rank 0, the same as JSON lines in output_dir/log.jsonl

class Logger:
    def __init__(self, output_dir, master):
        self.master = master
        self.path = Path(output_dir) / "log.jsonl"

    def __call__(self, message):
        if self.master:
            print(message, flush=True)

    def record(self, values, line):
        if self.master:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(values) + "\n")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


# ----------------------------------------------------------------------------------------------
# 6. Data loading

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch after the first `start` samples of this rank."""

    def __init__(self, dataset, env, shuffle, seed, drop_last):
        super().__init__(dataset, env.world_size, env.rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def make_loader(dataset, args, env, train=True):
    """The loader of a data set: pinned batches on CUDA, and workers that persist across epochs
    (starting them costs seconds per epoch, which dominated short epochs; the data set's set_epoch
    reaches them through shared memory)."""
    sampler = ResumableSampler(dataset, env, shuffle=train, seed=args.seed, drop_last=train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=env.device.type == "cuda", drop_last=train, persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed))  # keeps the loader off the global RNG


def to_device(batch, device):
    """A batch on the device, its uint8 video normalised there (data.normalize_batch)."""
    return data.normalize_batch({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                 for k, v in batch.items()})


# ----------------------------------------------------------------------------------------------
# 7. The training loop (pre-training and fine-tuning)

def train(args, env, model, raw_model, optimizer, scaler, loader, compute_loss, log, on_epoch_end=None,
          check_batch=None):
    """Run the epochs. compute_loss(model, batch) returns a dict of scalar tensors with 'loss'.
    check_batch(batch), if given, checks each batch on the host, before it goes to the device.
    on_epoch_end(epoch) runs after each epoch (figures, testing); checkpoints are saved here.

    A step never waits for the device: the loss parts are summed on the device and read (and averaged
    over the ranks) at logging steps only. A non-finite loss (or gradient norm, without fp16's scaler) is
    noted on the device with its step; the next logging step, checkpoint or epoch end stops the run
    naming that step, without saving: checkpoints are written only from states known to be finite."""
    lr, min_lr, warmup_lr = (scaled(args, env, v) for v in (args.base_lr, args.min_lr, args.warmup_lr))
    steps_per_epoch = len(loader.sampler) // (args.batch_size * args.accum_steps)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    progress = start_state(args, env, raw_model, optimizer, scaler, log)
    monitor = data.BadSampleMonitor(args.max_bad_fraction)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    samples_per_step = args.batch_size * args.accum_steps * env.world_size
    log(f"{total_steps} steps of {samples_per_step} clips ({steps_per_epoch} per epoch), peak lr {lr:.3g}")
    never = 2**62
    first_bad = torch.full((), never, dtype=torch.long, device=env.device)  # first step with a non-finite value

    def check_finite():
        """Stop if any rank noted a non-finite value (a read of one number: at logging and saving only)."""
        bad = first_bad.clone()
        if env.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = bad.item()
        if bad != never:
            last = Path(args.output_dir) / "last.pth"
            raise SystemExit(f"non-finite loss or gradient norm at epoch {(bad - 1) // steps_per_epoch}, step {bad}: "
                             f"stopping. The last good checkpoint is {last if last.exists() else 'none yet'}")

    def checkpoint(name):
        check_finite()
        rng = capture_rng(env)
        if env.master:
            save_checkpoint(Path(args.output_dir) / name, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                progress=asdict(progress), args=vars(args), model_config=asdict(raw_model.cfg), rng=rng))

    sums, finite, count, t_data, t_last = None, None, 0, 0.0, time.time()
    for epoch in range(progress.epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = progress.batch * args.batch_size
        loader.dataset.set_epoch(epoch)
        model.train()
        batches = iter(loader)
        for micro in range(progress.batch, steps_per_epoch * args.accum_steps):
            t0 = time.time()
            batch = next(batches)
            t_data += time.time() - t0
            monitor.update(batch)  # the loader's host tensors: no device sync
            if check_batch is not None:
                check_batch(batch)
            batch = to_device(batch, env.device)
            last_micro = (micro + 1) % args.accum_steps == 0
            with model.no_sync() if env.ddp and not last_micro else nullcontext(), autocast(args, env):
                parts = compute_loss(model, batch)
            scaler.scale(parts["loss"] / args.accum_steps).backward()
            names = ["loss"] + [k for k in parts if k != "loss"]
            now = torch.stack([parts[k].detach().float() for k in names]) / args.accum_steps
            sums = now if sums is None else sums + now
            finite = torch.isfinite(now[0]) if finite is None else finite & torch.isfinite(now[0])
            if not last_micro:
                continue
            step_lr = lr_at(progress.step, total_steps, warmup_steps, lr, min_lr, warmup_lr)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group.get("lr_scale", 1.0)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not scaler.is_enabled():  # with fp16's scaler an infinite gradient only skips the step
                finite = finite & torch.isfinite(grad_norm)
            first_bad = torch.where(finite, first_bad, first_bad.clamp(max=progress.step + 1))
            progress.step, progress.batch, count, finite = progress.step + 1, micro + 1, count + 1, None

            if progress.step % args.log_every == 0 or progress.step == total_steps:
                check_finite()
                means = dict(zip(names, all_mean(sums / count, env).tolist()))
                elapsed = time.time() - t_last
                values = dict(epoch=epoch, step=progress.step, **means, lr=step_lr, grad_norm=grad_norm.item(),
                              samples_per_s=count * samples_per_step / elapsed, data_wait=t_data / elapsed,
                              eta_s=(total_steps - progress.step) * elapsed / count,
                              peak_mem_mb=peak_memory_mb(env.device))
                losses = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                log.record(values, f"epoch {epoch} step {progress.step}/{total_steps} | {losses} | lr {step_lr:.2e} "
                                   f"grad {values['grad_norm']:.3f} | {values['samples_per_s']:.1f} clips/s, "
                                   f"data wait {values['data_wait']:.0%}, eta {values['eta_s'] / 60:.1f} min, "
                                   f"peak mem {values['peak_mem_mb']:.0f} MB")
                sums, count, t_data, t_last = None, 0, 0.0, time.time()
            if args.save_every_steps and progress.step % args.save_every_steps == 0:
                checkpoint("last.pth")
            if args.stop_at_step and progress.step >= args.stop_at_step:
                checkpoint("last.pth")
                log(f"stopped at step {progress.step} (--stop_at_step); run again to resume")
                return progress
        progress.epoch, progress.batch = epoch + 1, 0
        check_finite()  # before testing or drawing a model that may be broken
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        checkpoint("last.pth")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            checkpoint(f"checkpoint-{epoch:03d}.pth")
    return progress


# ----------------------------------------------------------------------------------------------
# 8. Pre-training: the loss, the reconstruction figure, the benchmark

def pretrain_dataset(samples, cfg, sampling_rate, seed, strict=False):
    """Pre-training items of samples in the model's geometry and mask ratios (also evaluate.py's probe)."""
    return data.PretrainDataset(samples, img_size=cfg.img_size, num_frames=cfg.num_frames, sampling_rate=sampling_rate,
                                audio_frames=cfg.audio_frames, num_mel_bins=cfg.mel_bins, patch_size=cfg.patch_size,
                                tubelet_size=cfg.tubelet_size, video_mask_ratio=cfg.video_mask_ratio,
                                audio_mask_ratio=cfg.audio_mask_ratio, seed=seed, strict=strict)


def read_pretrain_manifest(args):
    return data.read_manifest(args.data_path, data.parse_root_map(args.root_map), task="pretrain")


def pretraining_loss_fn(cfg, gather, compile=False):
    """compute(model, batch) -> the loss parts. compile=True compiles the loss (the caller compiles the model):
    one graph each, except HCMCL's all-gather of the negatives, which may break the loss's graph."""
    loss_fn = torch.compile(pretrain_loss, fullgraph=not gather) if compile else pretrain_loss

    def compute(model, batch):
        out = model(batch["video"], batch["audio"], batch["video_mask"], batch["audio_mask"])
        parts = loss_fn(out, batch["video"], batch["audio"], batch["video_mask"], batch["audio_mask"], cfg, gather)
        if "hcmcl_acc" in parts:
            parts["hcmcl_acc"] = parts["hcmcl_acc"].mean()
        return parts
    return compute


def fill_masked(patches, pred, mask):
    """Put predictions (B, M, ...) into the masked positions of patches (B, N, ...)."""
    out = patches.clone()
    out[mask] = pred.reshape(-1, *patches.shape[2:]).to(out.dtype)
    return out


@torch.no_grad()
def save_reconstruction(path, model, batch, cfg):
    """A figure like the paper's Fig. 8: original, masked and reconstructed frames, then the same for
    the spectrogram. Predictions are mapped back to pixels with each true patch's mean and std."""
    model.eval()
    video, audio = batch["video"][:1].float(), batch["audio"][:1].float()
    video_mask, audio_mask = batch["video_mask"][:1], batch["audio_mask"][:1]
    out = model(video, audio, video_mask, audio_mask)
    mean = video.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = video.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    pixels = patchify_video(video * std + mean, cfg)  # (1, N, t*p*p, 3)
    masked_pixels = pixels[video_mask]  # (M, t*p*p, 3)
    pred = out["video_pred"].float().reshape(masked_pixels.shape)
    if cfg.frame_diff_target:  # the first frame of a token is appearance, the others differences from it
        pred = pred.reshape(pred.shape[0], cfg.tubelet_size, -1, 3)
        pred = torch.cat([pred[:, :1], pred[:, 1:] + pred[:, :1]], dim=1).reshape(masked_pixels.shape)
    if cfg.normalize_target:
        pred = pred * masked_pixels.std(dim=1, keepdim=True) + masked_pixels.mean(dim=1, keepdim=True)
    rows = [pixels, fill_masked(pixels, torch.full_like(masked_pixels, 0.5), video_mask),
            fill_masked(pixels, pred, video_mask)]
    frames = torch.cat([unpatchify_video(r.flatten(2), cfg)[0].transpose(0, 1) for r in rows])  # (3T, 3, H, W)
    grid = make_grid(frames.clamp(0, 1), nrow=cfg.num_frames, padding=2, pad_value=1.0)

    spec = patchify_audio(audio, cfg)  # (1, N, p*p)
    masked_spec = spec[audio_mask]
    pred_a = out["audio_pred"].float().reshape(masked_spec.shape)
    if cfg.normalize_target:
        pred_a = pred_a * masked_spec.std(dim=1, keepdim=True) + masked_spec.mean(dim=1, keepdim=True)
    low, high = spec.min(), spec.max()
    specs = [spec, fill_masked(spec, torch.full_like(masked_spec, low.item()), audio_mask), fill_masked(spec, pred_a, audio_mask)]
    images = [((unpatchify_audio(s, cfg)[0, 0].T.flip(0) - low) / (high - low)).clamp(0, 1) for s in specs]  # freq up
    strip = torch.cat([F.pad(im, (2, 2, 2, 2), value=1.0) for im in images], dim=1)
    strip = F.interpolate(strip[None, None], size=(round(strip.shape[0] * grid.shape[2] / strip.shape[1]), grid.shape[2]),
                          mode="nearest")[0].expand(3, -1, -1)
    save_image(torch.cat([grid, strip], dim=1), path)
    model.train()


def benchmark(args, env, cfg):
    """Training steps on random tensors made on the device, or with --data_path on the loader's batches:
    samples/s, TFLOP/s, MFU, peak memory; forward, backward and optimiser step timed apart (the device is
    synchronised between them here, never in training; the rate includes these waits); compiled, the
    compile time (the first step's excess over the median) and the graph breaks."""
    torch.manual_seed(args.seed)
    model = HiCMAE(cfg).to(env.device)
    optimizer = configure_optimizer(model, 1e-4, args.weight_decay, tuple(args.betas), device_type=env.device.type)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "fp16" and env.device.type == "cuda")
    B, g = args.batch_size, torch.Generator().manual_seed(0)
    random_batch = to_device(dict(
        video=torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=env.device),
        audio=torch.randn(B, 1, cfg.audio_frames, cfg.mel_bins, device=env.device),
        video_mask=torch.stack([data.tube_mask(*cfg.video_grid, cfg.video_mask_ratio, g) for _ in range(B)]),
        audio_mask=torch.stack([data.random_mask(cfg.num_audio_tokens, cfg.audio_mask_ratio, g) for _ in range(B)])),
        env.device)
    loader = (make_loader(pretrain_dataset(read_pretrain_manifest(args), cfg, args.sampling_rate, args.seed), args, env)
              if args.data_path else None)
    batches = iter(())
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    notes = []
    if args.compile:  # graph breaks of the forward and loss, as dynamo traces them (no compilation)
        with autocast(args, env):
            explained = torch._dynamo.explain(lambda b: pretraining_loss_fn(cfg, False)(model, b)["loss"])(random_batch)
        torch._dynamo.reset()
        notes.append(f"graph breaks in forward + loss: {explained.graph_break_count} (graphs: {explained.graph_count})")
    compute = pretraining_loss_fn(cfg, gather=False, compile=args.compile)
    fwd = torch.compile(model, fullgraph=True) if args.compile else model

    def step():
        nonlocal batches
        t0 = time.perf_counter()
        batch = random_batch
        if loader is not None:
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            batch = to_device(batch, env.device)
        t1 = time.perf_counter()
        with autocast(args, env):
            loss = compute(fwd, batch)["loss"]
        sync()
        t2 = time.perf_counter()
        scaler.scale(loss).backward()
        sync()
        t3 = time.perf_counter()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3  # data, forward, backward, optimiser

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(args.bench_warmup - 1):
        step()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times = torch.tensor([step() for _ in range(args.bench_steps)])  # (steps, 4) seconds
    seconds = times.sum().item()
    data_s, fwd_s, bwd_s, opt_s = times.median(0).values.tolist()
    samples_per_s = B * args.bench_steps / seconds
    tflops = 3 * 2 * count_macs(cfg, "pretrain") * samples_per_s / 1e12  # forward + backward = 3 x forward
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
    if args.compile:
        notes.append(f"compile {first - times.sum(1).median().item():.1f} s (first step {first:.1f} s)")
    if loader is not None:
        wait = times[:, 0].sum().item() / seconds
        notes.append(f"the loader ({args.num_workers} workers) included: data wait {wait:.0%}, "
                     f"median {data_s * 1e3:.1f} ms per step")
    print(f"benchmark: HiCMAE-{args.size} pre-training, {B} clips/step, {amp_dtype(args, env)}, "
          f"compile={args.compile}, "
          f"{device_name}: {samples_per_s:.1f} samples/s, {tflops:.1f} TFLOP/s, MFU {tflops / args.peak_tflops:.1%} "
          f"of {args.peak_tflops:g}, peak memory {peak_memory_mb(env.device):.0f} MB\n"
          f"  per step (median of {args.bench_steps}): forward {fwd_s * 1e3:.1f} ms, backward {bwd_s * 1e3:.1f} ms, "
          f"optimiser {opt_s * 1e3:.1f} ms" + "".join(f"\n  {n}" for n in notes), flush=True)
    return samples_per_s


# ----------------------------------------------------------------------------------------------
# 9. The demo recipe and main

DEMO_DIR = "demo_data"
DEMO_MODEL = dict(size="tiny", img_size=64, num_frames=8, audio_frames=128, mel_bins=64, dim=128, heads=4,
                  depth=4, fusion_depth=1, inter_layers=[1, 2, 3], decoder_dim=64, decoder_heads=2)
# The demo departs from the paper on purpose, to learn within 5 minutes on 2 CPU cores: 50% masks (a
# 64-pixel frame has only 16 patches, and at 90% the face's mouth and brows are hidden from the
# contrastive loss), a larger HCMCL weight (at 0.0025 the two encoders never align in so few steps;
# at 1.0 the reconstructions do not learn) and a larger learning rate.
DEMO = dict(DEMO_MODEL, output_dir="runs/demo_pretrain", batch_size=16, epochs=32, warmup_epochs=1, base_lr=0.048,
            min_lr=1e-4, num_workers=1, log_every=20, save_every=100, video_mask_ratio=0.5, audio_mask_ratio=0.5,
            hcmcl_weight=0.3)


def demo_manifests(env):
    """The demo data set's (train, test) manifests, written by rank 0 if missing."""
    train, test = Path(DEMO_DIR) / "train.csv", Path(DEMO_DIR) / "test.csv"
    if env.master and not (train.exists() and test.exists()):
        print(f"writing the demo data set to {DEMO_DIR}/ ...", flush=True)
        data.write_demo(DEMO_DIR)
    if env.ddp:
        dist.barrier()
    return str(train), str(test)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_training_args(parser, batch_size=40, epochs=100, base_lr=3e-4, min_lr=1e-5, betas=[0.9, 0.95],
                      output_dir="runs/pretrain")
    g = parser.add_argument_group("pre-training")
    g.add_argument("--gather_negatives", action="store_true",
                   help="HCMCL negatives from every GPU (default: the local batch, as the authors)")
    g.add_argument("--visualize_every", type=int, default=1, help="reconstruction figure every N epochs (0: never)")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps on random tensors (with --data_path: the loader's batches) and exit")
    g.add_argument("--bench_steps", type=int, default=30)
    g.add_argument("--bench_warmup", type=int, default=10)
    g.add_argument("--peak_tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16: 989)")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, DEMO)
    env = setup(args)
    cfg = model_config(args)
    if args.benchmark:
        return benchmark(args, env, cfg)
    log = Logger(args.output_dir, env.master)
    if args.data_path is None:
        args.data_path = demo_manifests(env)[0]
        log(f"no --data_path: pre-training a small model on the demo data set ({args.data_path})")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    log(f"model: {cfg}")

    dataset = pretrain_dataset(read_pretrain_manifest(args), cfg, args.sampling_rate, args.seed)
    loader = make_loader(dataset, args, env)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = HiCMAE(cfg).to(env.device)
    torch.manual_seed(args.seed + env.rank)  # then a stream of its own per rank (drop path)
    optimizer = configure_optimizer(raw_model, 0.0, args.weight_decay, tuple(args.betas), device_type=env.device.type)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "fp16" and env.device.type == "cuda")
    model = torch.compile(raw_model, fullgraph=True) if args.compile else raw_model
    if env.ddp:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    figure_batch = to_device(dataset[0], env.device) if env.master and args.visualize_every else None

    def on_epoch_end(epoch):
        if figure_batch is not None and (epoch + 1) % args.visualize_every == 0:
            batch = {k: v[None] if torch.is_tensor(v) else v for k, v in figure_batch.items()}
            save_reconstruction(Path(args.output_dir) / f"reconstruction-{epoch:03d}.png", raw_model, batch, cfg)

    gather = args.gather_negatives and env.ddp
    train(args, env, model, raw_model, optimizer, scaler, loader, pretraining_loss_fn(cfg, gather, args.compile), log,
          on_epoch_end, check_batch=lambda batch: check_masks(cfg, batch["video_mask"], batch["audio_mask"]))
    log(f"done: checkpoints in {args.output_dir}/")
    if env.ddp:
        del model  # DDP's reducer must go before its process group: freed after it, a rank can hang at exit
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
