"""Time pre-training steps: samples/s, TFLOP/s, MFU, peak memory, and forward, backward and optimiser apart.

    python tools/bench_step.py --size base --batch_size 40 [--compile] [--data_path M] [--dtype bf16]

On random tensors made on the device, or with --data_path on the loader's batches. The device is
synchronised between forward, backward and optimiser here (never in training); the rate includes these
waits. Compiled: the compile time (the first step's excess over the median) and the graph breaks.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from model import HiCMAE, configure_optimizer, count_macs  # noqa: E402
from pretrain import (HelpFormatter, add_device_args, add_model_args, amp_dtype, autocast, make_loader,  # noqa: E402
                      model_config, peak_memory_mb, pretraining_loss_fn, setup, to_device)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    g = parser.add_argument_group("steps")
    g.add_argument("--batch_size", type=int, default=40, help="clips per step")
    g.add_argument("--data_path", default=None, help="time the loader's batches of this manifest too")
    data.add_root_map(g)
    g.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a clip")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the loss (fullgraph=True)")
    add_device_args(g)
    g.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--bench_steps", type=int, default=30, help="timed steps")
    g.add_argument("--bench_warmup", type=int, default=10, help="untimed steps before them")
    g.add_argument("--peak_tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16: 989)")
    return parser


def random_batch(cfg, batch_size, device):
    g = torch.Generator().manual_seed(0)
    return to_device(dict(
        video=torch.randn(batch_size, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device),
        audio=torch.randn(batch_size, 1, cfg.audio_frames, cfg.mel_bins, device=device),
        video_mask=torch.stack([data.tube_mask(*cfg.video_grid, cfg.video_mask_ratio, g) for _ in range(batch_size)]),
        audio_mask=torch.stack([data.random_mask(cfg.num_audio_tokens, cfg.audio_mask_ratio, g)
                                for _ in range(batch_size)])), device)


def benchmark(args, env, cfg):
    """Print the report; returns samples/s."""
    torch.manual_seed(args.seed)
    model = HiCMAE(cfg).to(env.device)
    optimizer = configure_optimizer(model, 1e-4, args.weight_decay, tuple(args.betas), device_type=env.device.type)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "fp16" and env.device.type == "cuda")
    fixed = random_batch(cfg, args.batch_size, env.device)
    loader = None
    if args.data_path:
        samples = data.read_manifest(args.data_path, args.root_map, task="pretrain")
        loader = make_loader(data.PretrainDataset(samples, cfg, sampling_rate=args.sampling_rate, seed=args.seed),
                             args, env)
    batches = iter(())
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    notes = []
    if args.compile:  # graph breaks of the forward and loss, as dynamo traces them (no compilation)
        with autocast(args, env):
            explained = torch._dynamo.explain(lambda b: pretraining_loss_fn(cfg, False)(model, b)["loss"])(fixed)
        torch._dynamo.reset()
        notes.append(f"graph breaks in forward + loss: {explained.graph_break_count} (graphs: {explained.graph_count})")
    compute = pretraining_loss_fn(cfg, gather=False, compile=args.compile)
    fwd = torch.compile(model, fullgraph=True) if args.compile else model

    def step():
        nonlocal batches
        t0 = time.perf_counter()
        batch = fixed
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
    samples_per_s = args.batch_size * args.bench_steps / seconds
    tflops = 3 * 2 * count_macs(cfg, "pretrain") * samples_per_s / 1e12  # forward + backward = 3 x forward
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
    if args.compile:
        notes.append(f"compile {first - times.sum(1).median().item():.1f} s (first step {first:.1f} s)")
    if loader is not None:
        wait = times[:, 0].sum().item() / seconds
        notes.append(f"the loader ({args.num_workers} workers) included: data wait {wait:.0%}, "
                     f"median {data_s * 1e3:.1f} ms per step")
    print(f"benchmark: HiCMAE-{args.size} pre-training, {args.batch_size} clips/step, {amp_dtype(args, env)}, "
          f"compile={args.compile}, "
          f"{device_name}: {samples_per_s:.1f} samples/s, {tflops:.1f} TFLOP/s, MFU {tflops / args.peak_tflops:.1%} "
          f"of {args.peak_tflops:g}, peak memory {peak_memory_mb(env.device):.0f} MB\n"
          f"  per step (median of {args.bench_steps}): forward {fwd_s * 1e3:.1f} ms, backward {bwd_s * 1e3:.1f} ms, "
          f"optimiser {opt_s * 1e3:.1f} ms" + "".join(f"\n  {n}" for n in notes), flush=True)
    return samples_per_s


def main(argv=None):
    args = build_parser().parse_args(argv)
    env = setup(args)
    return benchmark(args, env, model_config(args))


if __name__ == "__main__":
    main()
