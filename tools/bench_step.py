"""Time training steps: clips/s, TFLOP/s, MFU, peak memory, and forward, backward and optimiser apart.

    python tools/bench_step.py --size base --batch_size 40 [--compile] [--cuda_graph] [--data_path M]
    python tools/bench_step.py --stage finetune --batch_size 14        # fine-tuning's step (A+V, 6 classes)
    python tools/bench_step.py --authors_code DIR --batch_size 40      # the authors' pre-training step

On random tensors made on the device, or with --data_path on the loader's batches. The rate is timed over
--bench_steps steps as training runs them (one synchronisation at the end); then a few more steps are
synchronised between forward, backward and optimiser to time each part. Compiled: the compile time (the
first step's excess over the median) and the graph breaks. --cuda_graph replays pretrain.py's whole step
as one CUDA graph. --authors_code DIR takes DIR's modeling_pretrain_av.py (github.com/sunlicai/HiCMAE,
with timm and einops installed) and runs HiCMAE-B's step as their engine does: targets under no_grad, fp16
autocast, loss.item(), GradScaler, AdamW, a synchronisation every step.
"""
import argparse
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from model import (HiCMAE, HiCMAEClassifier, configure_optimizer, count_macs, patchify_audio,  # noqa: E402
                   patchify_video, to_pixels, normalize_patches)
from pretrain import (CudaGraphStep, HelpFormatter, add_device_args, add_model_args, amp_dtype, autocast,  # noqa: E402
                      make_loader, model_config, peak_memory_mb, pretraining_loss_fn, set_lr, setup, to_device,
                      train_step)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    g = parser.add_argument_group("steps")
    g.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain",
                   help="pre-training's step, or fine-tuning's (A+V, 6 classes, cross-entropy, drop path 0.1)")
    g.add_argument("--batch_size", type=int, default=40, help="clips per step")
    g.add_argument("--data_path", default=None, help="time the loader's batches of this manifest too")
    data.add_root_map(g)
    g.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a clip")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the loss (fullgraph=True)")
    g.add_argument("--cuda_graph", action="store_true", help="pre-training's whole step as one CUDA graph")
    g.add_argument("--authors_code", default=None, help="a folder with the authors' modeling_pretrain_av.py")
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (default: none, as pretrain.py)")
    add_device_args(g)
    g.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--bench_steps", type=int, default=30, help="timed steps")
    g.add_argument("--bench_warmup", type=int, default=10, help="untimed steps before them")
    g.add_argument("--profile", action="store_true", help="then profile 5 steps: the GPU's busy share, top kernels")
    g.add_argument("--peak_tflops", type=float, default=989.0, help="for MFU (H100 SXM and H200 dense bf16: 989)")
    parser.set_defaults(accum_steps=1)  # pretrain.train_step's, which --cuda_graph replays
    return parser


def random_batch(cfg, batch_size, device):
    g = torch.Generator().manual_seed(0)
    return dict(
        video=torch.randint(0, 256, (batch_size, 3, cfg.num_frames, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                            generator=g).to(device),
        audio=torch.randn(batch_size, 1, cfg.audio_frames, cfg.mel_bins, generator=g).to(device),
        video_mask=torch.stack([data.tube_mask(*cfg.video_grid, cfg.video_mask_ratio, g)
                                for _ in range(batch_size)]).to(device),
        audio_mask=torch.stack([data.random_mask(cfg.num_audio_tokens, cfg.audio_mask_ratio, g)
                                for _ in range(batch_size)]).to(device),
        target=torch.arange(batch_size, device=device) % 6)


def finetuning_loss(model, batch):
    return dict(loss=F.cross_entropy(model(batch["video"], batch["audio"]).float(), batch["target"]))


def authors_model(folder, cfg):
    """Their HiCMAE-B as their pre-training script builds it (encoder 10, fusion 2, decoders 4 layers)."""
    sys.path.insert(0, str(Path(folder).resolve()))
    import modeling_pretrain_av  # noqa: the authors' file
    return modeling_pretrain_av.pretrain_hicmae_dim512_patch16_160_a256(
        encoder_depth=cfg.depth, encoder_depth_audio=cfg.depth, encoder_fusion_depth=cfg.fusion_depth,
        decoder_depth=cfg.decoder_depth, decoder_depth_audio=cfg.decoder_depth,
        inter_contrastive_temperature=cfg.temperature, return_intermediate_features=tuple(cfg.inter_layers))


def authors_loss(cfg):
    """Their engine's targets and losses (normalised tubelet targets, MSE, HCMCL), as compute(model, batch)."""
    def compute(model, batch):
        video, audio, vmask, amask = batch["video"], batch["audio"], batch["video_mask"], batch["audio_mask"]
        with torch.no_grad(), torch.autocast("cuda", enabled=False):
            v = normalize_patches(patchify_video(to_pixels(video), cfg)).flatten(2)
            a = normalize_patches(patchify_audio(audio, cfg)[..., None])[..., 0]
            v_target, a_target = v[vmask].reshape(len(v), -1, v.shape[-1]), a[amask].reshape(len(a), -1, a.shape[-1])
        with torch.autocast("cuda", dtype=torch.float16):
            video_pred, audio_pred, logits_v, logits_a = model(video, vmask, audio, amask)
            labels = torch.arange(len(video), device=video.device)
            loss = F.mse_loss(video_pred, v_target) + F.mse_loss(audio_pred, a_target)
            loss = loss + cfg.hcmcl_weight * sum(0.5 * (F.cross_entropy(lv, labels) + F.cross_entropy(la, labels))
                                                 for lv, la in zip(logits_v, logits_a))
        return dict(loss=loss)
    return compute


def build(args, env, cfg):
    """(model, optimizer, compute(model, batch) -> loss parts, what is timed) of the step asked for."""
    torch.manual_seed(args.seed)
    if args.authors_code is not None:
        model = authors_model(args.authors_code, cfg).to(env.device)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith("pos_embed")]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith("pos_embed")]
        optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                       dict(params=no_decay, weight_decay=0.0)], lr=1e-4, betas=tuple(args.betas))
        compute, kind = authors_loss(cfg), "authors' pre-training"
    elif args.stage == "finetune":
        model = HiCMAEClassifier(cfg, "av", 6).to(env.device)
        optimizer = configure_optimizer(model, 1e-4, args.weight_decay, tuple(args.betas), 0.75, env.device.type)
        compute, kind = finetuning_loss, "fine-tuning A+V"
    else:
        model = HiCMAE(cfg).to(env.device)
        optimizer = configure_optimizer(model, 1e-4, args.weight_decay, tuple(args.betas),
                                        device_type=env.device.type)
        compute, kind = pretraining_loss_fn(cfg, gather=False, compile=args.compile), "pre-training"
    return model, optimizer, compute, kind


def benchmark(args, env, cfg):
    """Print the report; returns clips/s."""
    authors = args.authors_code is not None
    if args.stage == "finetune":
        cfg = replace(cfg, drop_path=0.1)
    model, optimizer, compute, kind = build(args, env, cfg)
    fp16 = authors or (args.dtype == "fp16" and env.device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=fp16)
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
            explained = torch._dynamo.explain(lambda b: compute(model, b)["loss"])(to_device(fixed, env.device))
        torch._dynamo.reset()
        notes.append(f"graph breaks in forward + loss: {explained.graph_break_count} (graphs: {explained.graph_count})")
    fwd = torch.compile(model, fullgraph=True) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = None
    if args.cuda_graph:  # pretrain.py's step, without a gradient scaler (as --cuda_graph takes bf16 or fp32)
        step = partial(train_step, fwd, optimizer, torch.amp.GradScaler(enabled=False), params, compute, args, env)
        graphed = CudaGraphStep(step, optimizer, env.device)
        set_lr(optimizer, 1e-4)
    model.train()

    def next_batch():
        nonlocal batches
        if loader is None:
            return fixed
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        return batch

    def step(split=False):
        """(data, forward, backward, optimiser) seconds; without split all but the data wait are in forward."""
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        if graphed is not None:
            graphed([to_device(batch, env.device)])
            return t1 - t0, time.perf_counter() - t1, 0.0, 0.0
        batch = to_device(batch, env.device)
        with autocast(args, env):
            loss = compute(fwd, batch)["loss"]
        if authors:
            loss.item()  # their engine reads the loss every step
        if split:
            sync()
        t2 = time.perf_counter()
        scaler.scale(loss).backward()
        if split:
            sync()
        t3 = time.perf_counter()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if split or authors:
            sync()
        return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.bench_warmup - 1):
        step()
    sync()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    t0 = time.perf_counter()
    times = torch.tensor([step() for _ in range(args.bench_steps)])  # (steps, 4) seconds
    sync()
    seconds = time.perf_counter() - t0
    clips_per_s = args.batch_size * args.bench_steps / seconds
    if graphed is None:
        split = torch.tensor([step(split=True) for _ in range(min(10, args.bench_steps))]).median(0).values
        parts = (f"forward {split[1] * 1e3:.1f} ms, backward {split[2] * 1e3:.1f} ms, "
                 f"optimiser {split[3] * 1e3:.1f} ms (synchronised between them)")
    else:
        parts = f"one CUDA graph of {seconds / args.bench_steps * 1e3:.1f} ms a step"
    if args.compile:
        notes.append(f"compile {first - seconds / args.bench_steps:.1f} s (first step {first:.1f} s)")
    if loader is not None:
        wait = times[:, 0].sum().item() / seconds
        notes.append(f"the loader ({args.num_workers} workers) included: data wait {wait:.0%}, "
                     f"median {times[:, 0].median().item() * 1e3:.1f} ms per step")
    report(args, env, cfg, kind, clips_per_s, parts, notes)
    if args.profile:
        profile(step, sync)
    return clips_per_s


def report(args, env, cfg, kind, clips_per_s, parts, notes):
    authors = args.authors_code is not None
    macs = count_macs(cfg, "pretrain" if args.stage == "pretrain" else "av")
    if authors:  # their encoders embed every token before masking
        macs += (cfg.num_video_tokens - cfg.num_visible[0]) * 3 * cfg.tubelet_size * cfg.patch_size ** 2 * cfg.dim
    tflops = 3 * 2 * macs * clips_per_s / 1e12  # forward + backward = 3 x forward
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
    dtype = "fp16" if authors else amp_dtype(args, env)
    print(f"benchmark: HiCMAE-{args.size} {kind}, {args.batch_size} clips/step, {dtype}, compile={args.compile}, "
          f"cuda_graph={args.cuda_graph}, {device_name}: {clips_per_s:.1f} samples/s, {tflops:.1f} TFLOP/s, "
          f"MFU {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g}, peak memory {peak_memory_mb(env.device):.0f} MB"
          f"\n  per step (median of the split steps): {parts}" + "".join(f"\n  {n}" for n in notes), flush=True)


def profile(step, sync, steps=5):
    """The kernels' share of the wall time over a few steps and the kernels that take the most of it."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    print(f"  profile of {steps} steps: {wall * 1e3:.1f} ms wall, kernels {busy * 1e3:.1f} ms ({busy / wall:.0%} busy), "
          f"{len(kernels) / steps:.0f} kernels per step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cuda_graph and (args.stage != "pretrain" or args.authors_code or not args.device.startswith("cuda")):
        raise SystemExit("--cuda_graph: pre-training's step (ours) on a CUDA device only")
    env = setup(args)
    return benchmark(args, env, model_config(args))


if __name__ == "__main__":
    main()
