"""Self-supervised pre-training of HiCMAE (paper Sec. 3; recipe Sec. 4.1).

    python pretrain.py                                       # the built-in demo: demo data, small model, any device
    torchrun --nproc_per_node=4 pretrain.py --data_path vox2_dev.csv --output_dir runs/hicmae_b

One process per GPU under torchrun (NCCL on GPUs, gloo on CPU) with plain DistributedDataParallel;
without torchrun the same script runs as one process. This file also owns the training machinery
that finetune.py imports: arguments, distributed set-up, schedule, the training loop, checkpoints, logs.
"""

import argparse
import json
import math
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image

import data
from model import (SIZES, HiCMAE, HiCMAEConfig, configure_optimizer, load_checkpoint, load_weights,
                   make_config, model_state, patchify_audio, patchify_video, pretrain_loss, to_pixels, unpatchify_audio,
                   unpatchify_video)


# 1. Arguments (shared with finetune.py)

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's help as written, every flag's default after its help; not a default of None or False (a
    value the data or the --size preset decide, a switch that is off) nor where the help says it already."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DEMO_EPILOG = "Without --data_path the demo recipe replaces these defaults (explicit flags still win)."


def add_model_args(parser, skip=(), **defaults):
    """A flag per HiCMAEConfig field but `skip`'s; unset: the stage's `defaults`, the --size preset, the paper's."""
    group = parser.add_argument_group("model (defaults: the --size preset, then the paper's values)")
    group.add_argument("--size", default="base", choices=["tiny", "small", "base"], help="HiCMAE-T/S/B (default base)")
    for f in fields(HiCMAEConfig):
        if f.name in skip:
            continue
        value = defaults.get(f.name, f.default)
        if f.name in SIZES["base"]:
            text = "default by --size: " + ", ".join(f"{size} {preset[f.name]}" for size, preset in SIZES.items())
        elif f.name == "inter_layers":
            text = f"selected encoder layers, 0-based (default {' '.join(map(str, value))})"
        else:
            text = f"default {value}"
        kind = (dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else
                dict(type=int, nargs="+") if f.name == "inter_layers" else dict(type=type(f.default)))
        group.add_argument(f"--{f.name}", default=defaults.get(f.name), help=text, **kind)


def model_config(args):
    overrides = {f.name: getattr(args, f.name) for f in fields(HiCMAEConfig) if getattr(args, f.name, None) is not None}
    return make_config(args.size, **overrides)


def add_training_args(parser, **defaults):
    """Data, optimisation, precision, checkpoint and logging flags; `defaults` holds the stage's recipe."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="manifest in the authors' format (none: the demo data set)")
    data.add_root_map(g)
    g.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a clip")
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="save and stop once more than this share of the samples tried failed to decode")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=defaults["batch_size"], help="clips per GPU per micro-step")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--epochs", type=int, default=defaults["epochs"], help="epochs of the run")
    g.add_argument("--warmup_epochs", type=float, default=5, help="linear warm-up of the learning rate, in epochs")
    g.add_argument("--base_lr", type=float, default=defaults["base_lr"], help="lr = base_lr * total batch / 256")
    g.add_argument("--min_lr", type=float, default=defaults["min_lr"], help="end of the cosine, scaled like lr")
    g.add_argument("--warmup_lr", type=float, default=1e-6, help="start of the warm-up, scaled like lr")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=defaults["betas"], help="AdamW betas")
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    g = parser.add_argument_group("run")
    add_device_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the loss (fullgraph=True)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order and augmentation")
    g.add_argument("--output_dir", default=defaults["output_dir"], help="checkpoints and log.jsonl")
    g.add_argument("--resume", help="checkpoint to resume (default: output_dir/last.pth if any; none: start afresh)")
    g.add_argument("--init", default=None, help="start from these weights only (ours or the authors')")
    g.add_argument("--save_every", type=int, default=10, help="keep a checkpoint every N epochs")
    g.add_argument("--save_every_steps", type=int, default=0, help="also save last.pth every N steps")
    g.add_argument("--stop_at_step", type=int, default=0,
                   help="save and stop after this many steps, the schedule unchanged (to split a run into jobs)")
    g.add_argument("--time_limit", type=duration,
                   help="save and stop before this much wall time is spent (a job's limit): 4h, 90m, 3600s or seconds")
    g.add_argument("--log_every", type=int, default=20, help="steps between log lines (and each epoch's last)")


def add_device_args(parser):
    """--device, --dtype and --num_workers, as every stage takes them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                        help="autocast type (default: bf16 on cuda, fp32 on cpu; fp16 on cuda only)")
    parser.add_argument("--num_workers", type=int, default=min(8, cores_per_process()),
                        help="loader processes per GPU (default: the cores per process, at most 8: %(default)s here)")


def duration(text):
    """'4h', '90m', '30s', '2d' or plain seconds -> seconds."""
    units = dict(s=1, m=60, h=3600, d=86400)
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a duration such as 4h, 90m or 3600, not {text!r}") from None


def check_output_dir(path):
    """Stop in one line, before any work, if output_dir cannot be made or written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--output_dir {path}: cannot write there ({e.strerror or e})") from None


def parse_args(parser, argv, demo_defaults):
    """Parse; without --data_path the demo recipe replaces the defaults (explicit flags still win)."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--data_path" or a.startswith("--data_path=") for a in argv) and \
            not {"-h", "--help"} & set(argv):  # --help shows the recipe's defaults
        parser.set_defaults(**demo_defaults)
    return parser.parse_args(argv)


# 2. Distributed set-up

@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    ddp: bool
    started: float = 0.0  # time.time() at set-up, for --time_limit
    control: object = None  # a gloo group for small host-side messages (any backend)

    @property
    def master(self):
        return self.rank == 0


def cores_per_process():
    """The cores this process may use (its CPU affinity) over the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def setup(args):
    """One process per GPU under torchrun (RANK set), else a single process."""
    started, control = time.time(), None
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        control = dist.new_group(backend="gloo")
    else:
        rank, local_rank, world_size, device = 0, 0, 1, torch.device(args.device)
        if device.type == "cuda" and device.index is None:  # set_device needs the current GPU named
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the cores left to this process after its loader workers: more threads than cores spin and crawl
        torch.set_num_threads(max(1, cores_per_process() - args.num_workers))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(rank, local_rank, world_size, device, ddp, started, control)


def close(env):
    """End the process group, once train() has returned (DDP's reducer must go first, else a rank can hang)."""
    if env.ddp:
        dist.destroy_process_group()


def broadcast_object(obj, env):
    """Rank 0's object on every rank."""
    box = [obj]
    if env.ddp:
        dist.broadcast_object_list(box, src=0, group=env.control)
    return box[0]


def gather_objects(obj, env):
    """Every rank's object, in rank order."""
    objs = [obj] * env.world_size
    if env.ddp:
        dist.all_gather_object(objs, obj, group=env.control)
    return objs


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


# 3. Learning-rate schedule: linear warm-up, then cosine, over the clips trained

def lr_at(schedule, clip, total_clips):
    lr, min_lr, warmup_lr, warmup_clips = (schedule[k] for k in ("lr", "min_lr", "warmup_lr", "warmup_clips"))
    if clip < warmup_clips:
        return warmup_lr + (lr - warmup_lr) * clip / warmup_clips
    progress = min(1.0, (clip - warmup_clips) / max(1, total_clips - warmup_clips))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def plan(args, env, num_samples, position, schedule, log):
    """(schedule, clips per step, total steps) of a run over num_samples clips an epoch. The schedule saved with
    a resumed run goes on as it was; a fresh one is set by the run's first configuration."""
    steps_per_epoch = num_samples // env.world_size // args.batch_size // args.accum_steps  # as ResumableSampler deals
    clips_per_step = args.batch_size * args.accum_steps * env.world_size
    schedule = schedule or dict(  # the rates scaled by the total batch / 256
        lr=args.base_lr * clips_per_step / 256, min_lr=args.min_lr * clips_per_step / 256,
        warmup_lr=args.warmup_lr * clips_per_step / 256, clips_per_epoch=steps_per_epoch * clips_per_step,
        warmup_clips=round(args.warmup_epochs * steps_per_epoch) * clips_per_step)
    steps_left = max(0, args.epochs - position.epoch - 1) * steps_per_epoch
    if position.epoch < args.epochs:  # the current epoch, after the position.clips clips already trained
        steps_left += (num_samples - position.clips) // env.world_size // args.batch_size // args.accum_steps
    total_steps = position.step + steps_left
    log(f"{total_steps} steps of {clips_per_step} clips ({steps_per_epoch} per epoch; epochs count from 0, as "
        f"the checkpoint names), peak lr {schedule['lr']:.3g} = --base_lr x total batch / 256")
    warmup_steps = schedule["warmup_clips"] // clips_per_step
    if warmup_steps >= total_steps:
        log(f"note: the warm-up ({args.warmup_epochs:g} epochs, {warmup_steps} steps) is not shorter than the run "
            f"({total_steps} steps): the learning rate never reaches its peak; lower --warmup_epochs")
    if clips_per_step < 16:
        log(f"note: a total batch of {clips_per_step} scales the peak learning rate down to {clips_per_step}/256 of "
            "--base_lr; raise --base_lr (or the batch) to train at the recipe's rate")
    return schedule, clips_per_step, total_steps


# 4. Checkpoints: the run's position, saving, resuming

@dataclass
class RunPosition:
    """Where a run is; saved in its checkpoints as "progress"."""
    epoch: int = 0  # current epoch
    clips: int = 0  # clips of this epoch already trained, by all the ranks together
    step: int = 0  # optimiser steps done in the whole run


def tensor_bytes(state):
    """Bytes of the tensors in a nested state: about what its checkpoint needs on disk."""
    if torch.is_tensor(state):
        return state.nbytes
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


def save_checkpoint(path, state):
    """Write a temporary file, then rename it. A failed write removes it, keeps the older checkpoint and
    raises OSError naming the path, the space needed and the space free."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise OSError(f"could not save {path}: {tensor_bytes(state) / 1e6:.1f} MB needed, {free / 1e6:.1f} MB "
                      f"free there ({type(e).__name__}: {str(e).splitlines()[0]}); {kept}") from None


def capture_rng(env):
    """Every rank's RNG states (CPU, CUDA, Python), gathered so that rank 0 can save them."""
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                 cuda=torch.cuda.get_rng_state() if env.device.type == "cuda" else None)
    return gather_objects(state, env)


def restore_rng(state, env):
    """This rank's RNG states, as capture_rng took them."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def save_run(path, env, state):
    """Every rank: rank 0 writes the run's state with every rank's RNG states; a failed write stops every rank."""
    state, error = dict(state, rng=capture_rng(env)), None
    if env.master:
        try:
            save_checkpoint(path, state)
        except OSError as e:
            error = str(e)
    if broadcast_object(error, env):
        raise SystemExit(error)


def resume_path(args):
    """The checkpoint to resume: --resume, else output_dir/last.pth if present; None: start afresh."""
    if args.resume in ("none", ""):
        return None
    path = Path(args.resume or Path(args.output_dir) / "last.pth")
    return path if args.resume or path.exists() else None


def read_checkpoint(path, env, log):
    """The checkpoint at path, as rank 0 reads it. Every rank reads its own copy (a node may have a disk of its
    own); a rank that cannot, or that finds another position there, gets rank 0's. If rank 0 cannot, all stop."""
    try:
        checkpoint, problem = load_checkpoint(path), None
    except (OSError, ValueError) as e:
        checkpoint, problem = None, str(e)
    if env.master and problem:
        older = sorted(Path(path).parent.glob("checkpoint-*.pth"))
        problem = (f"cannot resume on node {socket.gethostname()} (rank 0): {problem}\n" +
                   (f"to go on from the newest older checkpoint, pass --resume {older[-1]}" if older else
                    "no older checkpoint-EEE.pth beside it: start afresh with --resume none"))
    if broadcast_object(problem, env):  # rank 0's
        raise SystemExit(problem)
    position = broadcast_object(checkpoint["progress"] if env.master else None, env)
    has_it = checkpoint is not None and checkpoint["progress"] == position
    lacking = [f"rank {rank} on {node}" for rank, node in
               enumerate(gather_objects(None if has_it else socket.gethostname(), env)) if node]
    if lacking:
        log(f"{', '.join(lacking)} could not read {path} (or found another state there): rank 0 sends its copy")
        checkpoint = broadcast_object(checkpoint, env)
    return checkpoint


def load_model_state(raw_model, checkpoint, args, path):
    """The checkpoint's weights into raw_model; another model, modality or number of outputs stops in one line."""
    try:
        raw_model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        there = dict(checkpoint.get("args", {}), **checkpoint.get("model_config", {}))
        here = dict(vars(args), **asdict(raw_model.cfg))
        keys = [*asdict(raw_model.cfg), "modality", "num_outputs"]
        differ = ", ".join(f"{k} {there.get(k)} there, {here.get(k)} here" for k in keys if there.get(k) != here.get(k))
        raise SystemExit(f"{path} holds a run of another configuration ({differ}): resume it with its own flags, "
                         "or start afresh with --resume none or another --output_dir") from None


def start_state(args, env, raw_model, optimizer, scaler, log):
    """Resume, or load --init weights, or start fresh: (position, the schedule saved with it or None)."""
    path = broadcast_object(resume_path(args), env)  # rank 0 chooses
    if path is None:
        if args.resume in ("none", "") and (Path(args.output_dir) / "last.pth").exists():
            log(f"--resume none: starting afresh; the checkpoints in {args.output_dir}/ will be replaced")
        if args.init:
            load_weights(raw_model, model_state(load_checkpoint(args.init)), log=log)
            log(f"initialised from {args.init}")
        if env.master:  # a fresh run (--resume none too) starts its own log (Logger's)
            (Path(args.output_dir) / "log.jsonl").unlink(missing_ok=True)
        return RunPosition(), None
    checkpoint = read_checkpoint(path, env, log)
    load_model_state(raw_model, checkpoint, args, path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # a --cuda_graph run saves a device lr and capturable AdamW: plain again
        group["lr"], group["capturable"] = float(group["lr"]), False
    scaler.load_state_dict(checkpoint["scaler"])
    position = RunPosition(**checkpoint["progress"])
    where = (f"epoch {position.epoch} after {position.clips} clips" if position.clips else
             f"the start of epoch {position.epoch}")
    log(f"resumed from {path} at {where} (step {position.step})")
    saved_by = len(checkpoint["rng"])  # processes
    same_world_size = saved_by == env.world_size
    if same_world_size:  # each rank's random streams go on where they were
        restore_rng(checkpoint["rng"][env.rank], env)
    was = (saved_by, checkpoint["args"]["batch_size"], checkpoint["args"]["accum_steps"])
    now = (env.world_size, args.batch_size, args.accum_steps)
    if was != now:
        rng = ("each process's random state is restored (as many processes as saved them)" if same_world_size else
               f"the random states saved by {saved_by} processes are not restored in {env.world_size}: the random "
               "streams start afresh")
        log("processes x clips x micro-steps per step changed from {} x {} x {} to {} x {} x {}: the learning-rate "
            "schedule goes on as saved, epoch {} after its first {} clips; {} (the losses are not bit-identical to "
            "an unbroken run)".format(*was, *now, position.epoch, position.clips, rng))
    return position, checkpoint.get("schedule")


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


# 6. Data loading

class ResumableSampler(torch.utils.data.DistributedSampler):
    """In training, the clips of an epoch from one order dealt to the ranks in turn, after its first `start`
    clips: resumable with any number of ranks and batch size."""

    def __init__(self, dataset, env, shuffle, seed, drop_last):
        super().__init__(dataset, env.world_size, env.rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0  # clips of this epoch already trained, by all the ranks together

    def __iter__(self):
        if not self.drop_last:  # testing: every clip, padded to a multiple of the ranks as DistributedSampler does
            return super().__iter__()
        order = (torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(len(self.dataset))).tolist()[self.start:]
        return iter(order[self.rank:len(order) - len(order) % self.num_replicas:self.num_replicas])

    def __len__(self):
        return (len(self.dataset) - self.start) // self.num_replicas if self.drop_last else self.num_samples


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and torchrun send before a job is stopped


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM and SIGUSR1 to the training process (which ends them when it is done)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, args, env, train=True):
    """Pinned batches on CUDA; workers persist across epochs (set_epoch reaches them through shared memory)."""
    sampler = ResumableSampler(dataset, env, shuffle=train, seed=args.seed, drop_last=train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=env.device.type == "cuda", drop_last=train, persistent_workers=args.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))  # keeps the loader off the global RNG


def to_device(batch, device):
    """A batch on the device, its uint8 video normalised there (data.normalize_batch)."""
    return data.normalize_batch({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                 for k, v in batch.items()})


# 7. The training loop (pre-training and fine-tuning) and, before it, what it calls

class LoaderFailed(Exception):
    """The loader cannot go on; the message, one line, says why and what to check."""


def epoch_batches(loader, manifest):
    """The loader's batches, from the first fetch on. A sample it could not replace (a DataError, as when the data
    root is gone) or a worker that died raises LoaderFailed. Meanwhile torch's SIGCHLD handler is set aside: it
    raises a dead worker's error wherever the main thread is, even inside the optimiser's step; without it the
    fetch finds the death (within 5 s)."""
    handler = signal.getsignal(signal.SIGCHLD)
    try:
        batches = iter(loader)  # the first call starts the workers, and sets torch's handler
        handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        yield from batches
    except data.DataError as e:  # from a worker, under the worker's traceback: its last line is the message
        line = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise LoaderFailed(f"{line}; is the data root still there? (`python data.py check {manifest}` checks every "
                           "row; once the data is back, the same command goes on)") from None
    except Exception:  # a dead worker shows as one of several errors; is one dead, or dying (wait up to 1 s)?
        workers = getattr(loader._iterator, "_workers", [])  # persistent workers (DataLoader has no public list)
        ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=1) if workers else []
        dead = next((w for w in workers if w.sentinel in ended), None)
        if dead is None:
            raise
        dead.join()  # for its exit code
        how = f"was killed by {signal.Signals(-dead.exitcode).name}" if dead.exitcode < 0 else "ended"
        raise LoaderFailed(f"loader worker {dead.pid} {how}: by the out-of-memory killer? (dmesg; fewer "
                           "--num_workers use less memory; the same command goes on)") from None
    finally:
        signal.signal(signal.SIGCHLD, handler)


def fetch(batches, count, meter):
    """The step's `count` micro-batches, or the one-line reason the loader failed; meter counts the wait and the
    bad samples."""
    micro_batches = []
    try:
        for _ in range(count):
            t0 = time.time()
            micro_batches.append(next(batches))
            meter.fetched(micro_batches[-1], time.time() - t0)
    except LoaderFailed as e:
        return None, str(e)
    return micro_batches, None


def end_workers(*loaders):
    """End the loaders' worker processes, whatever ended the run. They ignore SIGTERM (ignore_stop_signals), and
    SIGTERM is how the interpreter's exit ends them: a process that leaves them running waits on them for ever."""
    for loader in loaders:
        batches = loader._iterator  # persistent workers' iterator (DataLoader has no public close)
        if batches is not None:
            batches._shutdown_workers()  # each worker told to stop and joined
            for worker in batches._workers:
                if worker.is_alive():  # one stuck in a read
                    worker.kill()
            loader._iterator = None


class Stops:
    """Why the run stops, agreed by every rank before each step and at each epoch's end: a failure of any rank's
    (its loader failed, or too many bad samples), SIGTERM or SIGUSR1 (noted by the handlers this context
    installs), --time_limit near (two of the longest steps to spare, once a step is timed) or --stop_at_step."""
    REQUESTS = ["--stop_at_step", "--time_limit", "SIGUSR1", "SIGTERM"]  # in rising urgency; a failure beats them

    def __init__(self, args, env):
        self.args, self.env, self.received, self.failure = args, env, [], None
        self.longest, self.last = 0.0, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.receive) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def receive(self, signum, frame):
        self.received.append(signal.Signals(signum).name)

    def fail(self, reason):
        """Note a failure of this rank's, in one line (None: none)."""
        self.failure = self.failure or reason

    def agree(self, steps_done):
        """'' to go on, a request (REQUESTS) or a failure's line (the first failing rank's)."""
        now = time.time()
        if self.last is not None:
            self.longest = max(self.longest, now - self.last)
        self.last = now
        requests = list(self.received)
        if self.args.stop_at_step and steps_done >= self.args.stop_at_step:
            requests.append("--stop_at_step")
        if self.args.time_limit and self.longest and now - self.env.started + 2 * self.longest > self.args.time_limit:
            requests.append("--time_limit")
        urgency = max([self.REQUESTS.index(r) + 1 for r in requests], default=0)  # 0: go on
        if self.failure:
            urgency = len(self.REQUESTS) + 1
        if self.env.ddp:  # the most urgent of every rank's
            urgency = torch.tensor([urgency])
            dist.all_reduce(urgency, op=dist.ReduceOp.MAX, group=self.env.control)
            urgency = int(urgency)
        if urgency <= len(self.REQUESTS):
            return ["", *self.REQUESTS][urgency]
        return next(f for f in gather_objects(self.failure, self.env) if f)


def stopped(reason, step, path, log):
    """After a stop's save: a request says so and returns False; a failure exits in one line."""
    if reason in Stops.REQUESTS:
        log(f"stopped after step {step} ({reason}): saved {path}; run the same command again to go on")
        return False
    raise SystemExit(f"{reason}. Stopped after step {step}, saved in {path}")


class NonFinite:
    """The first step whose loss or gradient norm was not finite, noted on the device (no host read) and read
    where the run logs, saves or ends an epoch: then every rank stops, leaving the last good checkpoint. With
    fp16's scaler (grad_norm False) an infinite gradient norm only skips the step."""
    NEVER = 2**62

    def __init__(self, env, grad_norm=True):
        self.env, self.grad_norm = env, grad_norm
        self.first = torch.full((), self.NEVER, dtype=torch.long, device=env.device)

    def note(self, step, parts, grad_norm):
        """A step's loss parts (one dict per micro-batch) and gradient norm."""
        values = [micro["loss"].detach() for micro in parts] + ([grad_norm] if self.grad_norm else [])
        for value in values:
            self.first = torch.where(torch.isfinite(value), self.first, self.first.clamp(max=step))

    def check(self, last):
        first = self.first.clone()
        if self.env.ddp:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != self.NEVER:
            raise SystemExit(f"non-finite loss or gradient norm at step {first.item()}: stopping. "
                             f"The last good checkpoint is {last if last.exists() else 'none yet'}")


class Meter:
    """What a log line reports since the last one: the loss parts summed on the device, the time waiting for
    data, and the samples replaced (the items' `bad`) with their rows, counted from the loader's host batches.
    log() returns why to stop once more than max_bad_fraction of the run's samples tried (at least
    1 / max_bad_fraction of them, in all processes) failed."""

    def __init__(self, samples, max_bad_fraction):
        self.samples, self.max_bad_fraction = samples, max_bad_fraction
        self.min_tried = math.ceil(1 / max_bad_fraction) if max_bad_fraction > 0 else 1
        self.run_bad = self.run_tried = 0
        self.start_interval()

    def start_interval(self):
        self.names, self.sums, self.count, self.t_data, self.t_last = [], None, 0, 0.0, time.time()
        self.bad = self.tried = 0
        self.rows = []

    def fetched(self, batch, seconds):
        """A host batch from the loader, after `seconds` of waiting: no device sync."""
        self.t_data += seconds
        bad = torch.as_tensor(batch["bad"])
        replaced = int(bad.sum())
        self.bad += replaced
        self.tried += len(bad) + replaced
        if replaced:
            self.rows += [self.samples[i].row for i in torch.as_tensor(batch["index"])[bad > 0].tolist()]

    def stepped(self, parts):
        """A step's loss parts, one dict per micro-batch: their mean, summed on the device."""
        self.names = ["loss"] + [k for k in parts[0] if k != "loss"]
        for micro in parts:
            now = torch.stack([micro[k].detach().float() for k in self.names]) / len(parts)
            self.sums = now if self.sums is None else self.sums + now
        self.count += 1

    def log(self, log, env, epoch, step, total_steps, lr, grad_norm, clips_per_step):
        """Write the line (rank 0) and start the next interval; returns why the run must stop, or None."""
        means = self.sums / self.count
        counts = torch.tensor([self.bad, self.tried])
        rows = self.rows
        if env.ddp:  # the mean over the ranks, every rank's replaced samples
            dist.all_reduce(means)
            means /= env.world_size
            dist.all_reduce(counts, group=env.control)
            rows = sum(gather_objects(rows, env), []) if counts[0] else []
        bad, tried = counts.tolist()
        means = dict(zip(self.names, means.tolist()))
        elapsed = time.time() - self.t_last
        values = dict(epoch=epoch, step=step, **means, lr=lr, grad_norm=grad_norm.item(),
                      samples_per_s=self.count * clips_per_step / elapsed, data_wait=self.t_data / elapsed,
                      eta_s=(total_steps - step) * elapsed / self.count, peak_mem_mb=peak_memory_mb(env.device),
                      bad_samples=bad, bad_rows=rows)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        replaced = f" | {bad} bad samples replaced: {', '.join(rows[:5])}{more}" if bad else ""
        log.record(values, f"epoch {epoch} step {step}/{total_steps} | {losses} | "
                           f"lr {lr:.2e} grad {values['grad_norm']:.3f} | "
                           f"{values['samples_per_s']:.1f} clips/s, data wait {values['data_wait']:.0%}, "
                           f"eta {values['eta_s'] / 60:.1f} min, peak mem {values['peak_mem_mb']:.0f} MB{replaced}")
        self.start_interval()
        self.run_bad += bad
        self.run_tried += tried
        if self.run_tried >= self.min_tried and self.run_bad > self.max_bad_fraction * self.run_tried:
            return (f"{self.run_bad} of {self.run_tried} samples failed to decode ({self.run_bad / self.run_tried:.1%}"
                    f", more than --max_bad_fraction {self.max_bad_fraction:.1%}); the log names them, and "
                    "`python data.py check MANIFEST` lists every bad row")
        return None


def set_lr(optimizer, lr):
    """Each group's learning rate: lr times its lr_scale (a device tensor's value under --cuda_graph)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def train_step(model, optimizer, scaler, params, compute_loss, args, env, batches):
    """The one optimiser step: forward and backward of each micro-batch (device batches, one at a time;
    gradients synced on the last), then unscale, clip and step. Returns each micro-batch's loss parts and the
    gradient norm, on the device."""
    parts = []
    for micro, batch in enumerate(batches):
        sync = not env.ddp or micro + 1 == args.accum_steps
        with nullcontext() if sync else model.no_sync(), autocast(args, env):
            parts.append(compute_loss(model, batch))
        scaler.scale(parts[-1]["loss"] / args.accum_steps).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return parts, grad_norm


class CudaGraphStep:
    """--cuda_graph: a step (train_step with its arguments bound, on one device batch) captured once as a CUDA
    graph, then replayed with each new batch copied into the graph's inputs. Capture needs static shapes (the
    masks' token counts are fixed by the ratios), no host syncs in the step, AdamW's lr as a device tensor
    (capturable) and no fp16 scaler (bf16 or fp32). The first WARMUP steps run eagerly on a side stream, as
    capture requires: real training steps, not repeated."""
    WARMUP = 3

    def __init__(self, step, optimizer, device):
        self.step, self.optimizer, self.steps, self.graph = step, optimizer, 0, None
        for group in optimizer.param_groups:  # set_lr fills them
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.stream = torch.cuda.Stream(device)

    def __call__(self, batches):
        """One training step on one device batch: (loss parts, gradient norm), as train_step returns them."""
        batch, = batches
        self.steps += 1
        if self.steps <= self.WARMUP:
            return self.warm_up(batch)
        if self.graph is None:
            self.capture(batch)
        return self.replay(batch)

    def warm_up(self, batch):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = self.step([batch])
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, batch):
        """Record the step on the graph's own inputs, a copy of this batch's tensors: nothing runs yet."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
        self.inputs = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self.step([self.inputs])

    def replay(self, batch):
        """Run the recorded step on this batch; copies of its outputs (the next replay overwrites them)."""
        for k, v in self.inputs.items():
            v.copy_(batch[k])
        self.graph.replay()
        parts, grad_norm = self.outputs
        return [{k: v.clone() for k, v in micro.items()} for micro in parts], grad_norm.clone()


def training_model(args, env, raw_model):
    """What the loop runs: raw_model compiled with --compile, in DistributedDataParallel under torchrun."""
    model = torch.compile(raw_model, fullgraph=True) if args.compile else raw_model
    if env.ddp:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return model


def train(args, env, raw_model, optimizer, loader, compute_loss, log, on_epoch_end=lambda epoch: None,
          cuda_graph=False):
    """Run the epochs: True once all are done, False if stopped on request (last.pth saved); a failure (a
    loader's, too many bad samples) saves last.pth and exits in one line. compute_loss(model, batch) -> dict of
    scalar tensors with 'loss'; on_epoch_end(epoch) runs before the epoch's checkpoints. Between logging steps
    nothing is read from the device. The caller ends the loader's workers (end_workers), whatever happens."""
    scaler = torch.amp.GradScaler(enabled=amp_dtype(args, env) == "fp16")  # fp16 is on cuda only (autocast)
    model = training_model(args, env, raw_model)  # freed when train returns, before close() ends its process group
    position, schedule = start_state(args, env, raw_model, optimizer, scaler, log)
    schedule, clips_per_step, total_steps = plan(args, env, len(loader.dataset), position, schedule, log)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    step = partial(train_step, model, optimizer, scaler, params, compute_loss, args, env)
    step = CudaGraphStep(step, optimizer, env.device) if cuda_graph else step
    meter, finite = Meter(loader.dataset.samples, args.max_bad_fraction), NonFinite(env, not scaler.is_enabled())
    last = Path(args.output_dir) / "last.pth"

    def save(path):
        finite.check(last)
        save_run(path, env, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), args=vars(args),
                                 scaler=scaler.state_dict(), progress=asdict(position), schedule=schedule,
                                 model_config=asdict(raw_model.cfg)))

    with Stops(args, env) as stops:
        for epoch in range(position.epoch, args.epochs):
            loader.sampler.set_epoch(epoch)
            loader.sampler.start = position.clips
            loader.dataset.set_epoch(epoch)
            batches, steps = epoch_batches(loader, args.data_path), len(loader) // args.accum_steps
            model.train()
            for i in range(steps):
                # fetch the step's micro-batches
                micro_batches, failure = fetch(batches, args.accum_steps, meter)
                stops.fail(failure)
                # stop before the step if any rank must: every rank stops after the same step
                reason = stops.agree(position.step)
                if reason:
                    save(last)
                    return stopped(reason, position.step, last, log)
                # the step: forward and backward of each micro-batch, one optimiser step
                lr = lr_at(schedule, epoch * schedule["clips_per_epoch"] + position.clips,
                           args.epochs * schedule["clips_per_epoch"])
                set_lr(optimizer, lr)
                parts, grad_norm = step(to_device(batch, env.device) for batch in micro_batches)
                position.step, position.clips = position.step + 1, position.clips + clips_per_step
                meter.stepped(parts)
                finite.note(position.step, parts, grad_norm)
                # log, every log_every steps and at the epoch's end
                if position.step % args.log_every == 0 or i + 1 == steps:
                    finite.check(last)
                    stops.fail(meter.log(log, env, epoch, position.step, total_steps, lr, grad_norm, clips_per_step))
                # save
                if args.save_every_steps and position.step % args.save_every_steps == 0:
                    save(last)
            # the epoch's end
            reason = stops.agree(position.step)
            if reason:
                save(last)
                return stopped(reason, position.step, last, log)
            position.epoch, position.clips = epoch + 1, 0
            finite.check(last)  # before testing or drawing a model that may be broken
            on_epoch_end(epoch)
            save(last)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                save(last.with_name(f"checkpoint-{epoch:03d}.pth"))
    return True


# 8. Pre-training: the loss and the reconstruction figure

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
    pixels = patchify_video(to_pixels(video), cfg)  # (1, N, t*p*p, 3)
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

    mel = patchify_audio(audio, cfg)  # (1, N, p*p)
    masked_mel = mel[audio_mask]
    pred_a = out["audio_pred"].float().reshape(masked_mel.shape)
    if cfg.normalize_target:
        pred_a = pred_a * masked_mel.std(dim=1, keepdim=True) + masked_mel.mean(dim=1, keepdim=True)
    low, high = mel.min(), mel.max()
    mels = [mel, fill_masked(mel, torch.full_like(masked_mel, low.item()), audio_mask),
            fill_masked(mel, pred_a, audio_mask)]
    images = [((unpatchify_audio(m, cfg)[0, 0].T.flip(0) - low) / (high - low)).clamp(0, 1) for m in mels]  # freq up
    strip = torch.cat([F.pad(im, (2, 2, 2, 2), value=1.0) for im in images], dim=1)
    height = round(strip.shape[0] * grid.shape[2] / strip.shape[1])
    strip = F.interpolate(strip[None, None], size=(height, grid.shape[2]), mode="nearest")[0].expand(3, -1, -1)
    save_image(torch.cat([grid, strip], dim=1), path)
    model.train()


# 9. The demo recipe and main

DEMO_DIR = "demo_data"
DEMO_MODEL = dict(size="tiny", img_size=64, num_frames=8, audio_frames=128, mel_bins=64, dim=128, heads=4,
                  depth=4, fusion_depth=1, inter_layers=[1, 2, 3])  # the encoders' geometry, fine-tuning's too
# To learn within 5 minutes on 2 CPU cores: 50% masks (a 64-pixel frame has 16 patches; at 90% mouth and
# brows are hidden), a larger HCMCL weight (at 0.0025 the encoders do not align in so few steps), a larger lr.
DEMO = dict(DEMO_MODEL, decoder_dim=64, decoder_heads=2, output_dir="runs/demo_pretrain", batch_size=16, epochs=32,
            warmup_epochs=1, base_lr=0.048, min_lr=1e-4, num_workers=1, log_every=20, save_every=100,
            video_mask_ratio=0.5, audio_mask_ratio=0.5, hcmcl_weight=0.3)


def demo_manifests(env):
    """The demo data set's (train, test) manifests, written by rank 0 if missing."""
    train, test = Path(DEMO_DIR) / "train.csv", Path(DEMO_DIR) / "test.csv"
    if env.master and not (train.exists() and test.exists()):
        print(f"writing the demo data set to {DEMO_DIR}/ ...", flush=True)
        from tools.demo_data import write_demo
        write_demo(DEMO_DIR)
    if env.ddp:
        dist.barrier()
    return str(train), str(test)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=DEMO_EPILOG)
    add_model_args(parser)
    add_training_args(parser, batch_size=40, epochs=100, base_lr=3e-4, min_lr=1e-5, betas=[0.9, 0.95],
                      output_dir="runs/pretrain")
    g = parser.add_argument_group("pre-training")
    g.add_argument("--gather_negatives", action="store_true",
                   help="HCMCL negatives from every GPU (default: the local batch, as the authors)")
    g.add_argument("--visualize_every", type=int, default=1, help="reconstruction figure every N epochs (0: never)")
    g.add_argument("--cuda_graph", action="store_true",
                   help="replay the whole step as one CUDA graph (one GPU, bf16 or fp32, --accum_steps 1)")
    return parser


def check_cuda_graph(args, env):
    """Stop in one line where --cuda_graph cannot capture the step."""
    problem = ("needs a CUDA device" if env.device.type != "cuda" else
               "runs on one GPU (DDP's gradient all-reduce is not captured)" if env.ddp else
               "takes bf16 or fp32 (fp16's gradient scaler reads the device)" if amp_dtype(args, env) == "fp16" else
               "takes --accum_steps 1" if args.accum_steps != 1 else None)
    if problem:
        raise SystemExit(f"--cuda_graph {problem}")


def main(argv=None):
    args = parse_args(build_parser(), argv, DEMO)
    env = setup(args)
    if args.cuda_graph:
        check_cuda_graph(args, env)
    cfg = model_config(args)
    check_output_dir(args.output_dir)
    log = Logger(args.output_dir, env.master)
    if args.data_path is None:
        args.data_path = demo_manifests(env)[0]
        log(f"no --data_path: pre-training a small model on the demo data set ({args.data_path})")
    log(f"model: {cfg}")

    samples = data.read_manifest(args.data_path, args.root_map, task="pretrain")
    dataset = data.PretrainDataset(samples, cfg, sampling_rate=args.sampling_rate, seed=args.seed)
    loader = make_loader(dataset, args, env)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = HiCMAE(cfg).to(env.device)
    torch.manual_seed(args.seed + env.rank)  # then a stream of its own per rank (drop path)
    optimizer = configure_optimizer(raw_model, 0.0, args.weight_decay, tuple(args.betas), device_type=env.device.type)
    figure_batch = to_device(dataset[0], env.device) if env.master and args.visualize_every else None

    def on_epoch_end(epoch):
        if figure_batch is not None and (epoch + 1) % args.visualize_every == 0:
            batch = {k: v[None] if torch.is_tensor(v) else v for k, v in figure_batch.items()}
            path = Path(args.output_dir) / f"reconstruction-{epoch:03d}.png"
            save_reconstruction(path, raw_model, batch, cfg)
            log(f"wrote {path}")

    compute_loss = pretraining_loss_fn(cfg, args.gather_negatives and env.ddp, args.compile)
    try:
        finished = train(args, env, raw_model, optimizer, loader, compute_loss, log, on_epoch_end, args.cuda_graph)
    finally:
        end_workers(loader)
    if finished:
        log(f"done: checkpoints in {args.output_dir}/")
    close(env)
    return raw_model


if __name__ == "__main__":
    main()
