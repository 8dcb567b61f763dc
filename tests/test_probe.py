"""evaluate.py --probe: linear and k-NN probes, few-label subsets, retrieval and the reconstruction
baseline, on data where the answer is known; then the command on a tiny pre-training checkpoint."""
import json

from pathlib import Path

import pytest
import torch

import data
import evaluate
import pretrain
from model import make_config, reconstruction_targets
from tools.demo_data import write_demo

FIXTURES = Path(__file__).parent / "fixtures"


def labelled_features(n, dim, informative, seed):
    """(features (n, dim), labels (n,)): 4 balanced classes; with `informative`, each class shifts the
    features along its own random direction (4 sd), otherwise they are pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, dim, generator=g)
    if informative:
        directions = torch.randn(4, dim, generator=torch.Generator().manual_seed(99))
        x += 4 * torch.nn.functional.normalize(directions, dim=1)[y]
    return x, y


@pytest.mark.parametrize("probe", [evaluate.linear_probe, evaluate.knn_probe])
def test_probes_read_a_label_that_is_there_and_not_one_that_is_not(probe):
    train_x, train_y = labelled_features(240, 16, True, 0)
    test_x, test_y = labelled_features(80, 16, True, 1)
    assert probe(train_x, train_y, test_x, test_y, "classification", 4) >= 0.9
    noise_x, _ = labelled_features(240, 16, False, 2)
    noise_test, _ = labelled_features(80, 16, False, 3)
    # chance is 25%; 45% is more than 4 standard deviations above it for 80 test clips
    assert probe(noise_x, train_y, noise_test, test_y, "classification", 4) <= 0.45


def test_linear_probe_regression_is_ridge_with_a_ccc():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 16, generator=g), torch.randn(16, 2, generator=g)
    test = torch.randn(100, 16, generator=g)
    score = evaluate.linear_probe(x, x @ w, test, test @ w, "regression", None)
    assert score == pytest.approx(1.0, abs=1e-3)  # a noiseless linear target is recovered
    assert evaluate.linear_probe(x, torch.randn(200, 2, generator=g), test, test @ w, "regression", None) < 0.3


def test_few_label_subsets_hold_n_clips_of_every_class():
    y = torch.arange(40) % 4
    subsets = evaluate.few_label_subsets(y, 3, count=5)
    assert len(subsets) == 5
    for s in subsets:
        assert len(set(s.tolist())) == 12 and torch.bincount(y[s]).tolist() == [3, 3, 3, 3]
    assert any(not torch.equal(subsets[0], s) for s in subsets[1:])


def test_retrieval_ranks_partners_by_cosine():
    # 4 clips, 1 layer: audio i is nearest video i, except audio 3, whose partner comes second
    video = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]])
    audio = torch.tensor([[[1.0, 0.1, 0], [0, 1, 0.1], [0.1, 0, 1], [1, 0.3, 0]]])
    found = evaluate.retrieval(video, audio)
    # audio 3 scores .958 against video 0 and .880 against its partner video 3: second
    assert found["a2v_top1"] == [0.75] and found["a2v_top5"] == [1.0]
    # but video 3's nearest audio is audio 3 (.880; audio 0 .774), and video 0's is audio 0 (.995; audio 3 .958)
    assert found["v2a_top1"] == [1.0]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 50, 8, generator=g)
    assert evaluate.retrieval(v, v + 0.01 * torch.randn(2, 50, 8, generator=g))["a2v_top1"] == [1.0, 1.0]


class Oracle(torch.nn.Module):
    """A 'pre-training model' that predicts the true targets, or zeros."""

    def __init__(self, cfg, perfect):
        super().__init__()
        self.cfg, self.perfect = cfg, perfect

    def forward(self, video, audio, video_mask, audio_mask):
        v, a = reconstruction_targets(video, audio, video_mask, audio_mask, self.cfg)
        return dict(video_pred=v if self.perfect else torch.zeros_like(v), audio_pred=a if self.perfect else torch.zeros_like(a))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train, test = write_demo(tmp_path_factory.mktemp("demo"), num_train=8, num_test=8)
    return train, test


TINY = dict(img_size=32, num_frames=4, audio_frames=32, mel_bins=32, dim=32, heads=2, depth=4, fusion_depth=1,
            inter_layers=(1, 2, 3), decoder_dim=16, decoder_heads=2, video_mask_ratio=0.5, audio_mask_ratio=0.5)


def test_reconstruction_against_the_constant_predictor(demo):
    cfg = make_config("tiny", **TINY)
    samples = data.read_manifest(demo[1], task="classification")
    perfect = evaluate.reconstruction_vs_constant(Oracle(cfg, True), samples, cfg, 2, 4, 0, "cpu")
    zeros = evaluate.reconstruction_vs_constant(Oracle(cfg, False), samples, cfg, 2, 4, 0, "cpu")
    assert perfect["loss_video"] == 0 and perfect["loss_audio"] == 0
    for m in ("video", "audio"):
        assert perfect[f"const_{m}"] == zeros[f"const_{m}"] > 0
        # the mean target is the best constant: zeros do no better, and for per-patch normalised
        # targets only a little worse (each patch's mean is 0)
        assert zeros[f"const_{m}"] <= zeros[f"loss_{m}"] <= 1.5 * zeros[f"const_{m}"]


def test_probe_command_on_a_pretraining_checkpoint(demo, tmp_path, capsys):
    flags = ["--device", "cpu", "--size", "tiny", "--num_workers", "0", "--sampling_rate", "2", "--epochs", "1",
             "--batch_size", "4", "--visualize_every", "0", "--output_dir", str(tmp_path / "run")]
    for k, v in TINY.items():
        flags += [f"--{k}"] + ([str(i) for i in v] if isinstance(v, tuple) else [str(v)])
    pretrain.main(["--data_path", demo[0]] + flags)
    out = tmp_path / "probe.json"
    evaluate.main(["--probe", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data_path", demo[0],
                   "--test_path", demo[1], "--json", str(out), "--num_workers", "0", "--device", "cpu",
                   "--random_seeds", "2", "--labels_per_class", "1", "--subsets", "2", "--knn_k", "3"])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results) == {"pretrained", "random", "random_sd", "no_model", "setting"}
    for key in ("av_linear", "audio_linear", "video_linear", "av_knn", "av_few", "retrieval_top1"):
        assert 0 <= results["pretrained"][key] <= 1 and 0 <= results["random"][key] <= 1, key
    assert len(results["pretrained"]["a2v_top1"]) == 3  # one per HCMCL layer
    assert results["pretrained"]["const_video"] > 0 and results["pretrained"]["const_audio"] > 0
    assert "av linear probe" in printed and "video reconstruction on the test clips" in printed


@pytest.mark.parametrize("name", ["official_tiny_finetuned_checkpoint-best.pth", "official_tiny_checkpoint-99.pth"])
def test_probe_takes_the_authors_checkpoints(name, tmp_path):
    """Their fine-tuned and pre-training files (tiny fixture geometry, 4 heads) through --probe; a tiny
    manifest of frame folders at their 32 x 32 geometry stands in for a data set."""
    media = FIXTURES / "authors_test_views_media"
    rows = [f"{media / clip} {media / clip}.wav {label}" for clip, label in (("1001_DFA_ANG_XX", 0), ("1002_IEO_HAP_HI", 1))]
    manifest = tmp_path / "rows.csv"
    manifest.write_text("\n".join(rows * 2) + "\n")
    out = tmp_path / "probe.json"
    evaluate.main(["--probe", "--checkpoint", str(FIXTURES / name), "--heads", "4", "--data_path", str(manifest),
                   "--test_path", str(manifest), "--json", str(out), "--num_workers", "0", "--device", "cpu",
                   "--random_seeds", "1", "--labels_per_class", "0", "--knn_k", "1"])
    results = json.loads(out.read_text())
    assert results["setting"]["train_clips"] == 4 and "av_linear" in results["pretrained"]
    # the fixture's selected layers, which their pre-training file saves; a fine-tuned one has none: the last 3
    assert results["setting"]["inter_layers"] == ([0, 2, 3] if "99" in name else [1, 2, 3])
    assert "loss_video" not in results["pretrained"]  # their decoders' heads are not in the file: no reconstruction


def test_testing_the_authors_pretraining_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match=r"checkpoint-99\.pth: the authors' pre-training checkpoint has no head.*--probe"):
        evaluate.main(["--checkpoint", str(FIXTURES / "official_tiny_checkpoint-99.pth"), "--heads", "4",
                       "--video", str(FIXTURES / "authors_test_views_media" / "1001_DFA_ANG_XX"), "--device", "cpu"])
