"""Runs that survive a cluster, on CPU with gloo: preemption by SIGTERM, two nodes without a shared
disk, a resume with another number of processes, a full disk, a corrupt checkpoint, bad samples, a bad
--output_dir. The two-process runs share three launches (module fixtures) to keep the suite short."""
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import data
import finetune
import pretrain
from model import load_checkpoint
from test_pretrain import REPO, TINY, launch, logged, manifest  # noqa: F401 (manifest: a fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# pretrain.main with two test hooks: the clips of every micro-batch are written to RECORD_DIR/clips-rank<R>, one
# line each, and rank 0 sends SIGTERM to its parent (torchrun) after optimiser step SIGTERM_AT (0: never).
RECORDER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import pretrain

record, sigterm_at = sys.argv.pop(1), int(sys.argv.pop(1))
rank, loss_fn, steps = os.environ["RANK"], pretrain.pretraining_loss_fn, []


def recording_loss_fn(*args, **kwargs):
    compute = loss_fn(*args, **kwargs)

    def record_clips(model, batch):
        with open(os.path.join(record, "clips-rank" + rank), "a") as f:
            print(*batch["index"].tolist(), file=f)
        return compute(model, batch)
    return record_clips


def after_step(*_):
    steps.append(1)
    if rank == "0" and len(steps) == sigterm_at:
        os.kill(os.getppid(), signal.SIGTERM)  # to torchrun, as a scheduler does before preemption


pretrain.pretraining_loss_fn = recording_loss_fn
register_optimizer_step_post_hook(after_step)
model = pretrain.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join(record, "weights-rank" + rank + ".pt"))
"""
STEPS = 6  # 3 epochs of 2 steps: 8 clips, 2 processes x 2 clips


def start(commands, folders, logs, timeout=240):
    """Run commands at once, each in its own process group and folder, output to files in `logs`; on a
    time-out kill every group (torchrun's workers too). The exit codes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    outs = [open(logs / f"out{i}.txt", "w") for i in range(len(commands))]
    procs = [subprocess.Popen(c, cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
             for c, d, out in zip(commands, folders, outs)]
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"timed out after {timeout} s (a hang): " + "\n".join(
            (logs / f"out{i}.txt").read_text()[-2000:] for i in range(len(procs))))
    finally:
        for out in outs:
            out.close()


def recorded(path):
    return [[int(i) for i in line.split()] for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    path = tmp_path_factory.mktemp("recorder") / "recorder.py"
    path.write_text(RECORDER.format(repo=str(REPO)))
    return str(path)


def two_process_args(manifest, output_dir):
    return [*TINY, "--data_path", manifest, "--epochs", str(STEPS // 2), "--batch_size", "2",
            "--output_dir", output_dir]


@pytest.fixture(scope="module")
def straight(manifest, recorder, tmp_path_factory):
    """An unbroken two-process run."""
    root = tmp_path_factory.mktemp("straight")
    launch([*TORCHRUN, "--standalone", "--nproc_per_node", "2", recorder, str(root), "0",
            *two_process_args(manifest, str(root / "run"))])
    return root / "run"


@pytest.fixture(scope="module")
def preempted(manifest, recorder, tmp_path_factory):
    """The same run, SIGTERM sent to torchrun after step 2: (output folder, clips folder, the output)."""
    root = tmp_path_factory.mktemp("preempted")
    start([[*TORCHRUN, "--standalone", "--nproc_per_node", "2", recorder, str(root), "2",
            *two_process_args(manifest, str(root / "run"))]], [REPO], root)
    return root / "run", root, (root / "out0.txt").read_text()


@pytest.fixture(scope="module")
def two_nodes(manifest, recorder, preempted, tmp_path_factory):
    """The preempted run rerun as two `torchrun --nnodes 2` launches, each node with its own folder: node 0's
    holds the preempted run's output, node 1's nothing. --output_dir is relative: run/ in each node's folder."""
    root = tmp_path_factory.mktemp("two_nodes")
    shutil.copytree(preempted[0], root / "node0" / "run")
    (root / "node1").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    commands = [[*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr",
                 "127.0.0.1", "--master_port", str(port), recorder, str(root / f"node{node}"), "0",
                 *two_process_args(manifest, "run")] for node in (0, 1)]
    codes = start(commands, [root / "node0", root / "node1"], root, timeout=180)
    assert codes == [0, 0], (root / "out0.txt").read_text()[-3000:] + (root / "out1.txt").read_text()[-3000:]
    return root


def test_sigterm_to_torchrun_saves_last_pth_and_the_rerun_continues_exactly(preempted, straight, two_nodes):
    """The rerun is two_nodes' (the same world size, 2): its losses equal the unbroken run's, bit for bit."""
    output_dir, _, out = preempted
    stopped = re.search(r"stopped after step (\d+) \(SIGTERM\): saved .*last\.pth", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 2 <= step < STEPS
    assert load_checkpoint(output_dir / "last.pth")["progress"]["step"] == step
    assert not (output_dir / "last.pth.tmp").exists()
    resumed, unbroken = logged(two_nodes / "node0" / "run"), logged(straight)
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, unbroken):
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"]), a["step"]


def test_two_nodes_without_a_shared_disk_resume_the_same_state(preempted, two_nodes):
    """No hang; rank 1 (node 1 has no last.pth) gets rank 0's state and both end with identical weights."""
    saved = load_checkpoint(preempted[0] / "last.pth")["progress"]
    step = saved["step"]
    out = (two_nodes / "out0.txt").read_text()
    assert re.search(r"rank 1 on \S+ could not read run/last\.pth .*rank 0 sends its copy", out), out[-3000:]
    assert f"resumed from run/last.pth at epoch {saved['epoch']} after {saved['clips']} clips (step {step})" in out
    assert [r["step"] for r in logged(two_nodes / "node0" / "run")][step:] == list(range(step + 1, STEPS + 1))
    rank0 = torch.load(two_nodes / "node0" / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(two_nodes / "node1" / "weights-rank1.pt", weights_only=True)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k


def test_one_process_resuming_a_two_process_run_keeps_the_schedule_and_trains_each_clip_once(
        manifest, preempted, straight, tmp_path, monkeypatch, capsys):
    output_dir, clips_dir, _ = preempted
    shutil.copytree(output_dir, tmp_path / "run")
    saved = load_checkpoint(output_dir / "last.pth")["progress"]
    step = saved["step"]
    resumed_clips = []
    loss_fn = pretrain.pretraining_loss_fn

    def recording_loss_fn(*args, **kwargs):
        compute = loss_fn(*args, **kwargs)
        return lambda model, batch: resumed_clips.append(batch["index"].tolist()) or compute(model, batch)

    monkeypatch.setattr(pretrain, "pretraining_loss_fn", recording_loss_fn)
    pretrain.main(two_process_args(manifest, str(tmp_path / "run")))
    # the learning rate of the next clip is the one the unbroken two-process run used there
    resumed, unbroken = logged(tmp_path / "run")[step], logged(straight)[step]
    assert resumed["step"] == unbroken["step"] == step + 1
    assert resumed["lr"] == unbroken["lr"]
    # every epoch trains each of the 8 clips once: step by step, rank 0's clips then rank 1's, then one process'
    ranks = [recorded(clips_dir / f"clips-rank{r}") for r in (0, 1)]
    trained = [i for pair in zip(*ranks) for batch in pair for i in batch] + [i for b in resumed_clips for i in b]
    assert len(trained) == 3 * 8
    for epoch in range(3):
        assert sorted(trained[8 * epoch:8 * epoch + 8]) == list(range(8)), epoch
    # and one line says what changed
    out = capsys.readouterr().out
    assert re.search(r"per step changed from 2 x 2 x 1 to 1 x 2 x 1: .*epoch {} after its first {} clips"
                     .format(saved["epoch"], saved.get("clips")), out), out


@pytest.fixture
def no_larger_files_than(tmp_path):
    """Set RLIMIT_FSIZE (a write past it fails, as on a full disk) for the test's duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_says_why_removes_its_temporary_file_and_keeps_the_last_checkpoint(
        manifest, tmp_path, no_larger_files_than):
    out = tmp_path / "run"
    common = [*TINY, "--data_path", manifest, "--epochs", "1", "--batch_size", "2", "--output_dir", str(out)]
    pretrain.main([*common, "--stop_at_step", "2"])
    good = (out / "last.pth").read_bytes()
    no_larger_files_than(len(good) // 2)
    with pytest.raises(SystemExit, match=rf"could not save {re.escape(str(out / 'last.pth'))}: [\d.]+ MB needed, "
                                         r"[\d.]+ MB free there .*the previous last\.pth is kept"):
        pretrain.main(common)
    assert not (out / "last.pth.tmp").exists()
    assert (out / "last.pth").read_bytes() == good


def test_a_corrupt_last_checkpoint_is_called_corrupt_and_the_older_one_named(manifest, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "--data_path", manifest, "--epochs", "2", "--batch_size", "2", "--output_dir", str(out)]
    pretrain.main([*common, "--save_every", "1", "--stop_at_step", "5"])  # 4 steps per epoch
    last = out / "last.pth"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # a copy cut short
    older = out / "checkpoint-000.pth"
    with pytest.raises(SystemExit, match=rf"{re.escape(str(last))}: corrupt.*\n.*--resume {re.escape(str(older))}"):
        pretrain.main(common)
    pretrain.main([*common, "--resume", str(older)])  # the next step, as named
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(last)["progress"] == dict(epoch=2, clips=0, step=8)


@pytest.fixture
def with_bad_rows(manifest, tmp_path):
    """The 8 clips and 2 rows whose files are missing (rows 9 and 10): one process with 2 clips per batch
    draws all 10 rows every epoch."""
    path = tmp_path / "with_bad_rows.csv"
    path.write_text(Path(manifest).read_text() + "missing-1.mp4\nmissing-2.mp4\n")
    return str(path)


def test_bad_rows_are_named_in_every_epoch_and_counted_in_log_jsonl(with_bad_rows, tmp_path, capsys):
    pretrain.main([*TINY, "--data_path", with_bad_rows, "--epochs", "2", "--batch_size", "2",
                   "--output_dir", str(tmp_path / "run")])
    lines = capsys.readouterr().out.splitlines()
    records = logged(tmp_path / "run")
    for epoch in (0, 1):
        assert sum(r["bad_samples"] for r in records if r["epoch"] == epoch) >= 2
        named = " ".join(line for line in lines if line.startswith(f"epoch {epoch} step"))
        assert "with_bad_rows.csv:9" in named and "with_bad_rows.csv:10" in named, epoch
    for r in records:  # the count of an interval and the line agree
        line = next(line for line in lines if line.startswith(f"epoch {r['epoch']} step {r['step']}/"))
        assert (f"| {r['bad_samples']} bad samples replaced" in line) == (r["bad_samples"] > 0)


def test_a_run_stopped_by_max_bad_fraction_saves_its_state_first(with_bad_rows, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"samples failed to decode .*max_bad_fraction.*Stopped after step (\d+), "
                                         r"saved in .*last\.pth") as stop:
        pretrain.main([*TINY, "--data_path", with_bad_rows, "--epochs", "2", "--batch_size", "2", "--max_bad_fraction",
                       "0.1", "--output_dir", str(out)])
    step = int(re.search(r"Stopped after step (\d+)", str(stop.value)).group(1))
    assert load_checkpoint(out / "last.pth")["progress"]["step"] == step


def test_the_share_of_bad_samples_is_judged_over_the_run_once_enough_were_tried(tmp_path):
    """--max_bad_fraction 0.1: no verdict before 10 samples are tried; a replaced sample counts as tried too."""
    samples = [data.Sample(f"v{i}.mp4", None, None, f"m.csv:{i + 1}") for i in range(6)]
    meter = pretrain.Meter(samples, max_bad_fraction=0.1)
    env, log = pretrain.Env(0, 0, 1, torch.device("cpu"), False), pretrain.Logger(tmp_path, True)

    def interval(*batches):  # batches of (bad, index); returns the verdict and the interval's log.jsonl record
        for bad, index in batches:
            meter.fetched({"bad": torch.tensor(bad), "index": torch.tensor(index)}, 0.0)
        meter.stepped([{"loss": torch.tensor(1.0)}])
        verdict = meter.log(log, env, 0, 1, 1, 0.0, torch.tensor(0.0), len(batches[0][0]))
        return verdict, logged(tmp_path)[-1]

    verdict, record = interval(([0, 0, 0, 0], [0, 1, 2, 3]), ([1, 0, 0, 0], [4, 5, 0, 1]))
    assert verdict is None and (record["bad_samples"], record["bad_rows"]) == (1, ["m.csv:5"])  # 1 of 9 tried
    verdict, record = interval(([0, 0, 0, 0], [2, 3, 4, 5]))
    assert verdict is None and (record["bad_samples"], record["bad_rows"]) == (0, [])  # 1 of 13
    verdict, _ = interval(([2, 0], [0, 1]))
    assert re.match(r"3 of 17 samples failed .*max_bad_fraction", verdict)


def test_a_bad_output_dir_stops_in_one_line_before_any_work(tmp_path):
    """Below a file: before the manifest (which does not exist either) is read."""
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "run")
    pretraining_only = {"--decoder_dim", "--decoder_heads", "--video_mask_ratio", "--audio_mask_ratio", "--visualize_every"}
    finetune_flags = [f for f, before in zip(TINY, [None, *TINY]) if not {f, before} & pretraining_only]
    finetune_flags += ["--test_path", str(tmp_path / "none.csv")]
    for main, flags in ((pretrain.main, TINY), (finetune.main, finetune_flags)):
        with pytest.raises(SystemExit, match=rf"^--output_dir {re.escape(bad)}: cannot write there "
                                             r"\(Not a directory\)$"):
            main([*flags, "--data_path", str(tmp_path / "none.csv"), "--output_dir", bad])


def test_sigusr1_and_time_limit_save_and_stop_after_the_current_step(manifest, tmp_path, capsys):
    common = [*TINY, "--data_path", manifest, "--epochs", "2", "--batch_size", "2"]
    steps = []

    def after_step(*_):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # not to kill pytest if train() does not handle it
    hook = register_optimizer_step_post_hook(after_step)
    try:
        pretrain.main([*common, "--output_dir", str(tmp_path / "usr1")])
    finally:
        hook.remove()
        signal.signal(signal.SIGUSR1, previous)
    assert "stopped after step 2 (SIGUSR1)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "usr1" / "last.pth")["progress"]["step"] == 2
    pretrain.main([*common, "--time_limit", "0.01s", "--output_dir", str(tmp_path / "limit")])
    assert "stopped after step 1 (--time_limit)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "limit" / "last.pth")["progress"]["step"] == 1


# pretrain.main with a test hook: after optimiser step AT, the rank named (of RANK) breaks the run. "move": renames
# the folder FOLDER to FOLDER-moved; "kill": SIGKILL to its loader's workers; "raise": an error in the step's code.
# Each rank writes its output to OUT/rank<R>.txt and the time of the break to OUT/broken.
BREAKER = """
import multiprocessing, os, signal, sys, time
sys.path.insert(0, {repo!r})
from torch.optim.optimizer import register_optimizer_step_post_hook
import pretrain

out, action, at, who, folder = sys.argv[1:6]
rank, steps = os.environ.get("RANK", "0"), []
log = open(os.path.join(out, "rank" + rank + ".txt"), "w")
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)


def after_step(*_):
    steps.append(1)
    if len(steps) != int(at) or rank != who:
        return
    with open(os.path.join(out, "broken"), "w") as f:
        print(time.time(), file=f)
    if action == "move":
        os.rename(folder, folder + "-moved")
    elif action == "kill":
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)
    else:
        raise ValueError("an error of the step's code")


register_optimizer_step_post_hook(after_step)
pretrain.main(sys.argv[6:])
"""
EXIT_BOUND = 30  # seconds from the break to the exit; about 2 s here (a dead worker is found within 6 s)


def break_run(root, action, at, who, folder, args, processes=1):
    """Run pretrain.py with the break; (exit code, seconds from the break to the exit, each rank's output)."""
    launcher = root / "breaker.py"
    launcher.write_text(BREAKER.format(repo=str(REPO)))
    launch = [sys.executable] if processes == 1 else [*TORCHRUN, "--standalone", "--nproc_per_node", str(processes)]
    code, = start([[*launch, str(launcher), str(root), action, str(at), str(who), str(folder), *args]], [REPO], root,
                  timeout=180)
    ended = time.time()
    outputs = [(root / f"rank{r}.txt").read_text() for r in range(processes)]
    return code, ended - float((root / "broken").read_text()), outputs


@pytest.fixture
def own_copy(manifest, tmp_path):
    """The 8 clips in a folder of the test's own (videos/), and their manifest."""
    shutil.copytree(Path(manifest).parent / "videos", tmp_path / "videos")
    path = tmp_path / "own.csv"
    path.write_text(Path(manifest).read_text().replace(str(Path(manifest).parent / "videos"), str(tmp_path / "videos")))
    return path


def stopped_step(output, message):
    """The step of the one-line failure that ends `output` (no traceback before it)."""
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert re.fullmatch(message + r"\. Stopped after step (\d+), saved in \S+/last\.pth", last), output[-3000:]
    return int(re.search(r"Stopped after step (\d+)", last).group(1))


def test_a_run_whose_data_disappears_saves_and_exits_in_one_line_and_goes_on_once_it_is_back(own_copy, tmp_path):
    """One process with a loader worker, as a run has it: the videos folder moved away after step 1. The worker's
    prefetched batches still train; then every sample fails and the run stops at a step, saved, exiting non-zero
    within EXIT_BOUND. Once the folder is back the same command goes on, and its losses are an unbroken run's."""
    args = [*TINY, "--data_path", str(own_copy), "--epochs", "3", "--batch_size", "2", "--num_workers", "1"]
    run = tmp_path / "run"
    code, seconds, (output,) = break_run(tmp_path, "move", 1, 0, tmp_path / "videos", [*args, "--output_dir", str(run)])
    assert code == 1 and seconds < EXIT_BOUND, (code, seconds)
    step = stopped_step(output, r"11 bad samples in a row, the last: \S+own\.csv:\d+: \S+/videos/\S+\.mp4: no such "
                                r"file or folder; is the data root still there\? \(`python data\.py check \S+own\.csv` "
                                r"checks every row; once the data is back, the same command goes on\)")
    assert 1 <= step < 12 and load_checkpoint(run / "last.pth")["progress"]["step"] == step
    (tmp_path / "videos-moved").rename(tmp_path / "videos")
    pretrain.main([*args, "--output_dir", str(run)])
    pretrain.main([*args, "--output_dir", str(tmp_path / "unbroken")])
    resumed, unbroken = logged(run), logged(tmp_path / "unbroken")
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken] == list(range(1, 13))
    for a, b in zip(resumed, unbroken):
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"]), a["step"]


def test_a_killed_loader_worker_stops_every_rank_at_the_same_step_and_the_rerun_continues_exactly(
        manifest, straight, tmp_path):
    """Two processes; rank 1's only loader worker killed by SIGKILL (as the out-of-memory killer does) after
    step 3. Both ranks stop after the same step, saying why in one line; the rerun equals the unbroken run."""
    args = [*two_process_args(manifest, str(tmp_path / "run")), "--num_workers", "1"]
    code, seconds, outputs = break_run(tmp_path, "kill", 3, 1, "-", args, processes=2)
    assert code != 0 and seconds < EXIT_BOUND, (code, seconds)
    message = r"loader worker \d+ was killed by SIGKILL: by the out-of-memory killer\? \(.*the same command goes on\)"
    steps = [stopped_step(output, message) for output in outputs]
    assert steps[0] == steps[1] and 3 <= steps[0] < STEPS
    assert load_checkpoint(tmp_path / "run" / "last.pth")["progress"]["step"] == steps[0]
    launch([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "pretrain.py"), *args])
    resumed, unbroken = logged(tmp_path / "run"), logged(straight)
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, unbroken):
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"]), a["step"]


def test_an_error_escaping_the_loop_does_not_leave_the_process_waiting_on_its_loader_workers(own_copy, tmp_path):
    """A bug's error (with its traceback) ends the process, although its loader worker ignores SIGTERM."""
    args = [*TINY, "--data_path", str(own_copy), "--epochs", "3", "--batch_size", "2", "--num_workers", "1"]
    code, seconds, (output,) = break_run(tmp_path, "raise", 2, 0, "-", [*args, "--output_dir", str(tmp_path / "run")])
    assert code == 1 and seconds < EXIT_BOUND, (code, seconds)
    assert output.strip().endswith("ValueError: an error of the step's code"), output[-3000:]


def test_the_resume_message_says_whether_the_random_states_were_restored(manifest, preempted, tmp_path):
    """Another batch size with the same number of processes: every state restored, and said; another number of
    processes: none restored, and said so."""
    common = [*TINY, "--data_path", manifest, "--epochs", "2", "--output_dir", str(tmp_path / "run")]
    pretrain.main([*common, "--batch_size", "2", "--stop_at_step", "1"])
    env = pretrain.Env(0, 0, 1, torch.device("cpu"), False)
    for saved, batch_size, restored in ((tmp_path / "run" / "last.pth", "4", True),
                                        (preempted[0] / "last.pth", "2", False)):
        args = pretrain.build_parser().parse_args([*common, "--batch_size", batch_size, "--resume", str(saved)])
        model = pretrain.HiCMAE(pretrain.model_config(args))
        optimizer = pretrain.configure_optimizer(model, 0.0, 0.05, (0.9, 0.95))
        torch.manual_seed(12345)
        before, messages = torch.get_rng_state(), []
        pretrain.start_state(args, env, model, optimizer, torch.amp.GradScaler(enabled=False), messages.append)
        changed = next(m for m in messages if "per step changed from" in m)
        if restored:
            assert torch.equal(torch.get_rng_state(), load_checkpoint(saved)["rng"][0]["torch"])
            assert "each process's random state is restored (as many processes as saved them)" in changed, changed
        else:
            assert torch.equal(torch.get_rng_state(), before)
            assert "the random states saved by 2 processes are not restored in 1: the random streams start afresh" \
                in changed, changed
