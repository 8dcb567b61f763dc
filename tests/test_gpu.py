"""On a CUDA GPU (skipped without one): the authors' tensors in float32, bf16 autocast near float32, the
fused attention kernels, torch.compile against eager, and checkpoints moving between GPU and CPU."""
from functools import partial

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import pretrain
from model import (HiCMAE, HiCMAEClassifier, configure_optimizer, load_checkpoint, load_weights, make_config,
                   pretrain_loss)
from pretrain import pretraining_loss_fn
from test_parity import FIXTURE, assert_bf16_close, assert_close, fixture_config, losses_and_grads
from test_pretrain import TINY, logged, run
from tools.demo_data import write_demo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def ref():
    ref = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    return ref, {k: v.to(CUDA) for k, v in ref["inputs"].items()}


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 means float32 here: no TF32 in matrix products or convolutions (pretrain.py enables it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_float32_on_the_gpu_equals_the_authors_tensors(ref):
    ref, x = ref
    cfg = fixture_config(ref)
    model = load_weights(HiCMAE(cfg).eval(), ref["pretrain_state_dict"]).to(CUDA)
    with torch.no_grad():
        out = model(x["video"], x["audio"], x["video_mask"], x["audio_mask"])
        losses = pretrain_loss(out, x["video"], x["audio"], x["video_mask"], x["audio_mask"], cfg)
    assert_close("video_pred", out["video_pred"].cpu(), ref["pretrain_outputs"]["video_pred"])
    assert_close("audio_pred", out["audio_pred"].cpu(), ref["pretrain_outputs"]["audio_pred"])
    for name, value in ref["pretrain_losses"].items():
        assert_close(name, losses[name].cpu(), value)
    classifier = HiCMAEClassifier(cfg, "av", ref["config"]["num_classes"]).eval()
    classifier = load_weights(classifier, ref["finetune_state_dict"]).to(CUDA)
    with torch.no_grad():
        logits = classifier(x["video"], x["audio"])
    assert_close("logits", logits.cpu(), ref["finetune_outputs"]["logits"])


def test_bf16_autocast_pretraining_and_finetuning_stay_near_float32(ref):
    ref, x = ref
    cfg = fixture_config(ref)
    model = load_weights(HiCMAE(cfg).eval(), ref["pretrain_state_dict"]).to(CUDA)
    _, fp32, grads32 = losses_and_grads(model, x, cfg, bf16=False)
    out, bf16, grads16 = losses_and_grads(model, x, cfg, bf16=True)
    assert out["video_pred"].dtype == torch.bfloat16  # autocast did run the model in bf16
    assert_bf16_close(fp32, grads32, bf16, grads16)

    # fine-tuning: logits within 2% of the authors' range (test_parity's CPU bound), gradients finite
    classifier = HiCMAEClassifier(cfg, "av", ref["config"]["num_classes"]).eval()
    classifier = load_weights(classifier, ref["finetune_state_dict"]).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = classifier(x["video"], x["audio"])
    expected = ref["finetune_outputs"]["logits"]
    assert logits.dtype == torch.bfloat16
    assert (logits.float().cpu() - expected).abs().max() <= 0.02 * (expected.max() - expected.min())
    torch.nn.functional.cross_entropy(logits.float(), torch.arange(len(logits), device=CUDA) % logits.shape[1]).backward()
    assert all(torch.isfinite(p.grad).all() for p in classifier.parameters() if p.grad is not None)


def test_attention_runs_on_the_fused_kernels_in_bf16():
    """HiCMAE-B's shapes with the math kernel ruled out: a fallback to it raises 'No available kernel'."""
    cfg = make_config("base")
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=CUDA)
    audio = torch.randn(2, 1, cfg.audio_frames, cfg.mel_bins, device=CUDA)
    video_mask = torch.stack([data.tube_mask(*cfg.video_grid, cfg.video_mask_ratio, g) for _ in range(2)]).to(CUDA)
    audio_mask = torch.stack([data.random_mask(cfg.num_audio_tokens, cfg.audio_mask_ratio, g) for _ in range(2)]).to(CUDA)
    model, classifier = HiCMAE(cfg).to(CUDA), HiCMAEClassifier(cfg, "av", 6).to(CUDA)
    for backends in ([SDPBackend.FLASH_ATTENTION], [SDPBackend.EFFICIENT_ATTENTION]):
        with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(video, audio, video_mask, audio_mask)
            pretrain_loss(out, video, audio, video_mask, audio_mask, cfg)["loss"].backward()
            classifier(video, audio).float().sum().backward()


def test_compiled_losses_equal_eager_within_bf16_tolerance(ref):
    ref, x = ref
    cfg = fixture_config(ref)
    model = load_weights(HiCMAE(cfg).eval(), ref["pretrain_state_dict"]).to(CUDA)
    eager, compiled = pretraining_loss_fn(cfg, False), pretraining_loss_fn(cfg, False, compile=True)
    compiled_model = torch.compile(model, fullgraph=True)

    def run_with(compute, module):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = compute(module, x)
        parts["loss"].backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_parts, eager_grads = run_with(eager, model)
    compiled_parts, compiled_grads = run_with(compiled, compiled_model)
    assert_bf16_close(eager_parts, eager_grads, compiled_parts, compiled_grads)


def test_a_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path):
    """4 steps per epoch: steps 1-3 on the GPU, 4-6 on the CPU, 7-8 on the GPU again, in float32, against
    one run on the GPU. The losses agree within 2%: the GPU's TF32 products (10-bit mantissas) and the
    CPU's float32 drift apart over a few steps at the tiny model's learning rate of 0.05."""
    manifest, _ = write_demo(tmp_path / "demo", seed=1, num_train=8, num_test=4)
    cpu = [*TINY, "--data_path", str(manifest), "--epochs", "2", "--batch_size", "2", "--dtype", "fp32"]
    gpu = [*cpu, "--device", "cuda"]  # the later --device wins
    run(*gpu, "--output_dir", str(tmp_path / "straight"))
    run(*gpu, "--output_dir", str(tmp_path / "split"), "--stop_at_step", "3")
    run(*cpu, "--output_dir", str(tmp_path / "split"), "--stop_at_step", "6")
    assert load_checkpoint(tmp_path / "split" / "last.pth")["progress"]["step"] == 6
    run(*gpu, "--output_dir", str(tmp_path / "split"))
    straight, split = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in straight] == list(range(1, 9))
    for a, b in zip(straight, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02) and b["lr"] == pytest.approx(a["lr"]), a["step"]
    weights = load_checkpoint(tmp_path / "split" / "last.pth")["model"]
    assert all(w.device.type == "cpu" and torch.isfinite(w).all() for w in weights.values())


def test_cuda_graph_step_equals_the_eager_step(ref):
    """pretrain.CudaGraphStep (3 eager warm-up steps, then one captured graph replayed) against the plain step
    (pretrain.train_step, train()'s path) from the authors' weights on the same 6 batches: every step's losses
    within the bf16 bounds of the tests above, the final weights within bf16's rounding of the eager ones."""
    ref, x = ref
    cfg = fixture_config(ref)
    args = pretrain.build_parser().parse_args(["--device", "cuda", "--dtype", "bf16", "--data_path", "x"])
    env = pretrain.Env(0, 0, 1, CUDA, False)
    g = torch.Generator().manual_seed(0)
    batches = [dict(video=torch.randint(0, 256, x["video"].shape, dtype=torch.uint8, generator=g),
                    audio=torch.randn(x["audio"].shape, generator=g),
                    video_mask=torch.stack([data.tube_mask(*cfg.video_grid, cfg.video_mask_ratio, g)
                                            for _ in range(len(x["video"]))]),
                    audio_mask=torch.stack([data.random_mask(cfg.num_audio_tokens, cfg.audio_mask_ratio, g)
                                            for _ in range(len(x["video"]))])) for _ in range(6)]
    compute = pretraining_loss_fn(cfg, False)
    runs = []
    for graphed in (False, True):
        model = load_weights(HiCMAE(cfg), ref["pretrain_state_dict"]).to(CUDA).train()
        optimizer = configure_optimizer(model, 0.0, 0.05, (0.9, 0.95), device_type="cuda")
        params = list(model.parameters())
        scaler = torch.amp.GradScaler(enabled=False)
        step = partial(pretrain.train_step, model, optimizer, scaler, params, compute, args, env)
        graph = pretrain.CudaGraphStep(step, optimizer, CUDA) if graphed else None
        losses = []
        for i, batch in enumerate(batches):
            pretrain.set_lr(optimizer, 1e-3 * (i + 1))  # a schedule that moves: the graph reads its lr from the device
            parts, _ = (graph or step)([pretrain.to_device(batch, CUDA)])
            losses.append({k: v.item() for k, v in parts[0].items()})
        assert graph is None or graph.graph is not None  # the last 3 steps were replays
        runs.append((losses, {n: p.detach().float().clone() for n, p in model.named_parameters()}))
    (eager, eager_weights), (graph, graph_weights) = runs
    for a, b in zip(eager, graph):
        for k in ("loss", "loss_video", "loss_audio"):
            assert b[k] == pytest.approx(a[k], rel=0.01), k
        assert b["loss_hcmcl"] == pytest.approx(a["loss_hcmcl"], abs=0.05)
    moved = [(graph_weights[n] - eager_weights[n]).abs().max().item() for n in eager_weights]
    assert max(moved) < 1e-2, max(moved)


def test_pretrain_with_cuda_graph_logs_the_losses_of_the_plain_run(tmp_path):
    """pretrain.py --cuda_graph through train(): 8 steps (3 warm-up, then replays), losses and lr of every
    logged step within 2% of the plain run's (the resume test's bound), its checkpoint resumable on the CPU."""
    manifest, _ = write_demo(tmp_path / "demo", seed=1, num_train=8, num_test=4)
    common = [*TINY, "--data_path", str(manifest), "--epochs", "2", "--batch_size", "2", "--dtype", "bf16",
              "--device", "cuda"]
    run(*common, "--output_dir", str(tmp_path / "plain"))
    run(*common, "--cuda_graph", "--output_dir", str(tmp_path / "graph"))
    plain, graph = logged(tmp_path / "plain"), logged(tmp_path / "graph")
    assert [r["step"] for r in graph] == [r["step"] for r in plain] == list(range(1, 9))
    for a, b in zip(plain, graph):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02) and b["lr"] == pytest.approx(a["lr"]), a["step"]
    run(*common, "--epochs", "3", "--device", "cpu", "--dtype", "fp32", "--output_dir", str(tmp_path / "graph"))
    assert [r["step"] for r in logged(tmp_path / "graph")][-1] == 12
