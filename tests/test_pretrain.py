"""pretrain.py on CPU: DDP equals one process, exact mid-epoch resume, NaN stop, --init, a falling loss."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

import pretrain
from model import convert_official, load_checkpoint, model_state
from tools import bench_step
from tools.demo_data import write_demo

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY = ["--device", "cpu", "--size", "tiny", "--img_size", "32", "--num_frames", "4", "--sampling_rate", "2",
        "--audio_frames", "32", "--mel_bins", "32", "--dim", "32", "--heads", "2", "--depth", "4",
        "--inter_layers", "1", "2", "3", "--fusion_depth", "1", "--decoder_dim", "16", "--decoder_heads", "2",
        "--video_mask_ratio", "0.5", "--audio_mask_ratio", "0.5", "--num_workers", "0", "--log_every", "1",
        "--warmup_epochs", "1", "--base_lr", "0.05", "--visualize_every", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    train, _ = write_demo(root, seed=1, num_train=8, num_test=4)
    return str(train)


def launch(command, timeout=300):
    """Run a command in its own process group; on a time-out kill the group (torchrun's workers too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(command)}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def run(*args, torchrun=False):
    """pretrain.py in a fresh process (one, or two under torchrun with gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    return launch(launcher + [str(REPO / "pretrain.py"), *args])


def logged(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def weights(path):
    return load_checkpoint(path)["model"]


def test_two_processes_equal_one_process_with_the_same_global_batch(manifest, tmp_path):
    common = [*TINY, "--data_path", manifest, "--epochs", "2", "--gather_negatives"]
    run(*common, "--batch_size", "4", "--output_dir", str(tmp_path / "one"))
    run(*common, "--batch_size", "2", "--output_dir", str(tmp_path / "two"), torchrun=True)
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "loss_video", "loss_audio", "loss_hcmcl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = weights(tmp_path / "one" / "last.pth"), weights(tmp_path / "two" / "last.pth")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_both_ranks_end_with_identical_weights(manifest, tmp_path):
    """Each rank saves its own weights after training (a small launcher around pretrain.main)."""
    launcher = tmp_path / "each_rank.py"
    launcher.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import pretrain\n"
        "model = pretrain.main(sys.argv[1:])\n"
        f"torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
            *TINY, "--data_path", manifest, "--epochs", "1", "--batch_size", "2", "--output_dir", str(tmp_path / "run")])
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = pretrain.HiCMAE(pretrain.model_config(pretrain.build_parser().parse_args(TINY))).state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # training happened
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k


def test_resume_in_the_middle_of_an_epoch_follows_the_same_trajectory(manifest, tmp_path):
    common = [*TINY, "--data_path", manifest, "--epochs", "2", "--batch_size", "2", "--drop_path", "0.2"]
    run(*common, "--output_dir", str(tmp_path / "straight"))
    run(*common, "--output_dir", str(tmp_path / "split"), "--stop_at_step", "5")  # 4 steps per epoch
    assert load_checkpoint(tmp_path / "split" / "last.pth")["progress"] == dict(epoch=1, clips=2, step=5)
    run(*common, "--output_dir", str(tmp_path / "split"))  # resumes from output_dir/last.pth
    straight, split = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(straight, split):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], a["step"]
    w1, w2 = weights(tmp_path / "straight" / "last.pth"), weights(tmp_path / "split" / "last.pth")
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def nan_at_third_loss(monkeypatch):
    """Make the third call of the pre-training loss return NaN; returns the list of calls."""
    calls = []
    real_loss = pretrain.pretrain_loss

    def loss_that_explodes(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(pretrain, "pretrain_loss", loss_that_explodes)
    return calls


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(manifest, tmp_path, monkeypatch):
    nan_at_third_loss(monkeypatch)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"non-finite loss .* step 3.*last\.pth"):
        pretrain.main([*TINY, "--data_path", manifest, "--epochs", "2", "--batch_size", "2",
                       "--save_every_steps", "1", "--output_dir", str(out)])
    checkpoint = load_checkpoint(out / "last.pth")
    assert checkpoint["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_a_non_finite_loss_between_checks_stops_at_the_next_check_naming_its_step(manifest, tmp_path, monkeypatch):
    """No logging until the end: the flag kept on the device is read when step 4 would save, which it must not."""
    calls = nan_at_third_loss(monkeypatch)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"non-finite loss .* step 3:.*last\.pth"):
        pretrain.main([*TINY, "--data_path", manifest, "--epochs", "2", "--batch_size", "2", "--log_every", "100",
                       "--save_every_steps", "2", "--output_dir", str(out)])
    assert len(calls) == 4  # the run went on to step 4 without reading the loss
    checkpoint = load_checkpoint(out / "last.pth")
    assert checkpoint["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def test_no_host_reads_between_logging_steps(manifest, tmp_path, monkeypatch):
    """Steps that do not log never wait for the device: no tensor is read on the host there, except the
    loader's host batch (its bad-sample count) and the optimiser's step counters, host tensors too."""
    host_side = tuple(os.sep + os.path.join("torch", *part) + os.sep for part in (["optim"], ["utils", "data"]))
    host_code = (pretrain.Meter.fetched.__code__,)
    steps, reads = [0], []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = frame = sys._getframe(1)
            while frame is not None and not (frame.f_code in host_code or any(h in frame.f_code.co_filename
                                                                              for h in host_side)):
                frame = frame.f_back
            if frame is None:  # no host-side code on the stack
                reads.append((steps[0], name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
            return real(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    hook = register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    try:  # 4 steps, logged after steps 2 and 4, saved after step 4
        pretrain.main([*TINY, "--data_path", manifest, "--epochs", "1", "--batch_size", "2", "--log_every", "2",
                       "--output_dir", str(tmp_path / "run")])
    finally:
        hook.remove()
    assert [r["step"] for r in logged(tmp_path / "run")] == [2, 4]
    between = [r for r in reads if r[0] % 2 != 0]  # from optimiser step 1 (3) to the next: all of step 2 (4)
    assert not between, f"host reads between logging steps (after step, read, where): {between}"
    assert any(r[0] == 2 for r in reads)  # the counting works: logging reads the losses


def test_init_from_the_authors_checkpoint(manifest, tmp_path):
    """The tiny authors' checkpoint, with lr 0 so that the saved weights are exactly the loaded ones."""
    config = ["--device", "cpu", "--size", "tiny", "--img_size", "32", "--num_frames", "16", "--audio_frames", "64",
              "--mel_bins", "32", "--dim", "64", "--heads", "4", "--depth", "4", "--inter_layers", "0", "2", "3",
              "--fusion_depth", "2", "--decoder_dim", "32", "--decoder_heads", "2", "--decoder_depth", "4",
              "--video_mask_ratio", "0.75", "--audio_mask_ratio", "0.5", "--num_workers", "0"]
    out = tmp_path / "init"
    stdout = run(*config, "--data_path", manifest, "--epochs", "1", "--batch_size", "4", "--base_lr", "0",
                 "--min_lr", "0", "--warmup_lr", "0", "--visualize_every", "0", "--output_dir", str(out),
                 "--init", str(FIXTURES / "official_tiny_checkpoint-99.pth"))
    assert "initialised from" in stdout
    theirs = convert_official(model_state(load_checkpoint(FIXTURES / "official_tiny_checkpoint-99.pth")))
    ours = weights(out / "last.pth")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_a_short_run_lowers_the_loss_and_draws_the_reconstruction(manifest, tmp_path):
    out = tmp_path / "short"
    run(*TINY[:-2], "--visualize_every", "3", "--data_path", manifest, "--epochs", "6", "--batch_size", "4",
        "--output_dir", str(out))
    losses = [r["loss"] for r in logged(out)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    figure = out / "reconstruction-005.png"
    with Image.open(figure) as image:
        assert image.mode == "RGB" and image.width > 4 * 32  # a row of 4 frames of 32 pixels, with padding


BENCH = TINY[:TINY.index("--log_every")]  # the model, device and loader flags


def test_benchmark_reports_throughput(capsys):
    samples_per_s = bench_step.main([*BENCH, "--batch_size", "2", "--bench_steps", "2", "--bench_warmup", "1"])
    assert samples_per_s > 0
    line = capsys.readouterr().out
    assert "samples/s" in line and "TFLOP/s" in line and "MFU" in line and "peak memory" in line
    assert all(f"{part} " in line and " ms" in line for part in ("forward", "backward", "optimiser"))


def test_compiled_benchmark_reports_graph_breaks_and_compile_time(capsys, monkeypatch, manifest):
    """Dynamo with the eager backend (no inductor build in a test): fullgraph=True fails on any break."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager", **kwargs))
    bench_step.main([*BENCH, "--compile", "--batch_size", "2", "--bench_steps", "2", "--bench_warmup", "1",
                     "--data_path", manifest])
    torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "graph breaks in forward + loss: 0 (graphs: 1)" in out
    assert re.search(r"compile -?\d+\.\d s \(first step \d+\.\d s\)", out)
    assert re.search(r"loader \(0 workers\) included: data wait \d+%", out)


def test_bench_step_runs_as_a_command():
    out = launch([sys.executable, str(REPO / "tools" / "bench_step.py"), *BENCH, "--batch_size", "2",
                  "--bench_steps", "2", "--bench_warmup", "1"])
    assert out.startswith("benchmark: HiCMAE-tiny pre-training, 2 clips/step, fp32, compile=False, cuda_graph=False, CPU: ")


def test_autocast_is_bf16_on_cpu_when_asked_and_fp32_by_default():
    env = pretrain.Env(0, 0, 1, torch.device("cpu"), False)
    args = pretrain.build_parser().parse_args(["--device", "cpu"])
    assert args.dtype is None
    with pretrain.autocast(args, env):
        assert not torch.is_autocast_enabled("cpu")
    args = pretrain.build_parser().parse_args(["--device", "cpu", "--dtype", "bf16"])
    with pretrain.autocast(args, env):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_plain_cuda_device_is_named_with_the_current_gpu(monkeypatch):
    """torch.cuda.set_device refuses an index-less "cuda": a single process names the current GPU.
    set_device is replaced by one that refuses as CUDA's does."""
    def set_device(device):
        if device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        named.append(device)

    named = []
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # setup turns TF32 on
    try:
        env = pretrain.setup(pretrain.build_parser().parse_args(["--device", "cuda"]))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert env.device == torch.device("cuda", 0) and named == [torch.device("cuda", 0)]


def test_a_fresh_start_in_a_used_folder_starts_its_own_log(manifest, tmp_path):
    common = [*TINY, "--data_path", manifest, "--epochs", "1", "--batch_size", "4", "--output_dir", str(tmp_path)]
    run(*common)
    assert [r["step"] for r in logged(tmp_path)] == [1, 2]
    run(*common, "--resume", "none")
    assert [r["step"] for r in logged(tmp_path)] == [1, 2]  # not [1, 2, 1, 2]


@pytest.mark.parametrize("device, ddp, flags, reason", [
    ("cpu", False, [], "needs a CUDA device"),
    ("cuda:0", True, [], "runs on one GPU"),
    ("cuda:0", False, ["--dtype", "fp16"], "takes bf16 or fp32"),
    ("cuda:0", False, ["--accum_steps", "2"], "takes --accum_steps 1")])
def test_cuda_graph_refuses_a_step_it_cannot_capture(device, ddp, flags, reason):
    args = pretrain.build_parser().parse_args(["--cuda_graph", "--data_path", "x", *flags])
    with pytest.raises(SystemExit, match=f"--cuda_graph {reason}"):
        pretrain.check_cuda_graph(args, pretrain.Env(0, 0, 1, torch.device(device), ddp))
    args = pretrain.build_parser().parse_args(["--cuda_graph", "--data_path", "x", "--dtype", "bf16"])
    pretrain.check_cuda_graph(args, pretrain.Env(0, 0, 1, torch.device("cuda:0"), False))  # one GPU, bf16: allowed
