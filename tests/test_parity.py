"""Parity with the authors' code: tensors their implementation computed (tests/fixtures/, see its README).

The fixture is read from HICMAE_PARITY_FIXTURE (default tests/fixtures/official_tiny.pt); every
dimension, depth, selected layer, ratio, temperature, loss weight and class count comes from it.
The checkpoints saved the authors' way lie beside a fixture NAME.pt as NAME_checkpoint-99.pth
(pre-training) and NAME_finetuned_checkpoint-best.pth (fine-tuning); the tests that need one skip
when the fixture has none.
"""
import os
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
from model import (HiCMAE, HiCMAEClassifier, HiCMAEConfig, authors_config, convert_official, load_checkpoint,
                   load_weights, model_state, pretrain_loss, reconstruction_targets)
from pretrain import Env, start_state

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = Path(os.environ.get("HICMAE_PARITY_FIXTURE", FIXTURES / "official_tiny.pt"))


def beside_fixture(suffix):
    """The checkpoint saved the authors' way beside the fixture (NAME.pt -> NAME_<suffix>), or a skip."""
    path = FIXTURE.with_name(f"{FIXTURE.stem}_{suffix}")
    if not path.exists():
        pytest.skip(f"the fixture has no checkpoint beside it ({path.name})")
    return path


@pytest.fixture(scope="module")
def ref():
    if not FIXTURE.exists():
        pytest.fail(f"parity fixture not found: {FIXTURE}")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def fixture_config(ref):
    c, x = ref["config"], ref["inputs"]
    patch = ref["pretrain_state_dict"]["encoder.patch_embed.proj.weight"].shape  # (C, 3, tubelet, p, p)
    assert tuple(c["video_mean"]) == (0.485, 0.456, 0.406) and tuple(c["video_std"]) == (0.229, 0.224, 0.225)
    return HiCMAEConfig(
        img_size=c["img_size"], num_frames=x["video"].shape[2], tubelet_size=patch[2], patch_size=patch[3],
        audio_frames=c["audio_size"][0], mel_bins=c["audio_size"][1],
        dim=c["dim"], heads=c["heads"], depth=c["depth"], fusion_depth=c["fusion_depth"],
        decoder_dim=c["dec_dim"], decoder_heads=c["dec_heads"], decoder_depth=c["dec_depth"],
        inter_layers=c["inter_layers"], video_mask_ratio=c["mask_ratio"], audio_mask_ratio=c["mask_ratio_audio"],
        temperature=c["temperature"], hcmcl_weight=c["loss_weight"],
        normalize_target=c["normalize_target"], frame_diff_target=c["frame_diff_target"])


def assert_close(name, ours, theirs):
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


def run_pretrain(model, ref, cfg):
    x = ref["inputs"]
    with torch.no_grad():
        out = model(x["video"], x["audio"], x["video_mask"], x["audio_mask"])
        losses = pretrain_loss(out, x["video"], x["audio"], x["video_mask"], x["audio_mask"], cfg)
        targets = reconstruction_targets(x["video"], x["audio"], x["video_mask"], x["audio_mask"], cfg)
    return out, losses, targets


def test_masks_of_fixture_match_config(ref):
    cfg, x = fixture_config(ref), ref["inputs"]
    num_visible_video, num_visible_audio = cfg.num_visible
    assert (~x["video_mask"]).sum(1).eq(num_visible_video).all()
    assert (~x["audio_mask"]).sum(1).eq(num_visible_audio).all()


def test_pretrain_outputs_and_losses(ref):
    cfg = fixture_config(ref)
    model = load_weights(HiCMAE(cfg).eval(), ref["pretrain_state_dict"])
    out, losses, (video_target, audio_target) = run_pretrain(model, ref, cfg)
    expected = ref["pretrain_outputs"]
    assert_close("video_pred", out["video_pred"], expected["video_pred"])
    assert_close("audio_pred", out["audio_pred"], expected["audio_pred"])
    logits = out["video_emb"] @ out["audio_emb"].transpose(1, 2) / cfg.temperature  # (layers, B, B)
    assert_close("logits_per_video", logits, expected["logits_per_video"])
    assert_close("logits_per_audio", logits.transpose(1, 2), expected["logits_per_audio"])
    assert_close("video_target", video_target, expected["video_target"])
    assert_close("audio_target", audio_target, expected["audio_target"])
    for name, value in ref["pretrain_losses"].items():
        assert_close(name, losses[name], value)


def test_finetune_outputs(ref):
    cfg, x = fixture_config(ref), ref["inputs"]
    model = HiCMAEClassifier(cfg, "av", ref["config"]["num_classes"]).eval()
    load_weights(model, ref["finetune_state_dict"])
    with torch.no_grad():
        features = model.forward_features(x["video"], x["audio"])
        logits = model.head(features)
    assert_close("features", features, ref["finetune_outputs"]["features"])
    assert_close("logits", logits, ref["finetune_outputs"]["logits"])


def test_released_checkpoint_loads_into_both_models(ref):
    """The authors' checkpoint file (with its pickled argparse.Namespace) through load_checkpoint."""
    cfg = fixture_config(ref)
    checkpoint = load_checkpoint(beside_fixture("checkpoint-99.pth"))
    assert checkpoint["epoch"] == 99
    pretrain = load_weights(HiCMAE(cfg).eval(), model_state(checkpoint))
    out, _, _ = run_pretrain(pretrain, ref, cfg)  # the same weights as the fixture's pre-training model
    assert_close("video_pred", out["video_pred"], ref["pretrain_outputs"]["video_pred"])
    assert_close("audio_pred", out["audio_pred"], ref["pretrain_outputs"]["audio_pred"])

    messages = []
    finetune = load_weights(HiCMAEClassifier(cfg, "av", 7), model_state(checkpoint), log=messages.append)
    ours = finetune.state_dict()
    theirs = model_state(checkpoint)
    assert torch.equal(ours["video_encoder.blocks.0.attn.qkv.weight"], theirs["encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(ours["fusion.audio_blocks.1.norm_q.weight"], theirs["encoder_fusion.blocks_audio.1.cross_norm1.weight"])
    assert any("head" in m for m in messages)  # the new head is reported as freshly initialised


def test_plain_weights_only_load_refuses_the_released_checkpoint():
    """Documents why load_checkpoint allow-lists argparse.Namespace (and nothing else)."""
    with pytest.raises(Exception):
        torch.load(beside_fixture("checkpoint-99.pth"), map_location="cpu", weights_only=True)


def fixture_logits(model, ref):
    x = ref["inputs"]
    with torch.no_grad():
        return model.eval()(x["video"], x["audio"])


def test_authors_finetuned_checkpoint_through_evaluate(ref):
    """evaluate.py's loader rebuilds the authors' fine-tuned model from their saved arguments and
    weights alone (the number of heads, which the file does not hold, given as --heads would)."""
    path = beside_fixture("finetuned_checkpoint-best.pth")
    model, run = evaluate.load_finetuned(path, heads=ref["config"]["heads"])
    cfg, theirs = fixture_config(ref), model.cfg
    for name in ("img_size", "num_frames", "tubelet_size", "patch_size", "audio_frames", "mel_bins", "dim", "depth",
                 "fusion_depth"):
        assert getattr(theirs, name) == getattr(cfg, name), name
    assert (run["task"], run["modality"], run["num_outputs"]) == ("classification", "av", ref["config"]["num_classes"])
    assert (run["num_clips"], run["num_crops"]) == (2, 2)  # their --test_num_segment 2 --test_num_crop 2
    assert_close("logits", fixture_logits(model, ref), ref["finetune_outputs"]["logits"])


def test_authors_finetuned_checkpoint_as_finetune_init(ref, tmp_path):
    """finetune.py --init takes the authors' geometry from the file; flags not given stay unset."""
    path = beside_fixture("finetuned_checkpoint-best.pth")
    args = finetune.build_parser().parse_args(["--init", str(path), "--heads", str(ref["config"]["heads"]),
                                               "--output_dir", str(tmp_path)])
    args.num_outputs = ref["config"]["num_classes"]
    model = finetune.build_model(args)
    start_state(args, Env(0, 0, 1, torch.device("cpu"), False), model, None, None, print)  # as train() does
    assert model.cfg.dim == ref["config"]["dim"] and model.cfg.img_size == ref["config"]["img_size"]
    theirs = convert_official(model_state(load_checkpoint(path)))
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()  # every weight, head included, came from the file
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert_close("logits", fixture_logits(model, ref), ref["finetune_outputs"]["logits"])


def test_bf16_autocast_stays_near_float32_and_the_losses_are_float32(ref, monkeypatch):
    """CPU autocast casts as CUDA's does: matrix products and convolutions in bf16 (8 significant bits,
    a relative rounding error of at most 2^-9 = 0.2% per input), norms, softmax and losses in float32.
    Tolerances: the reconstruction losses are means over thousands of squared errors, so rounding errors
    of a fraction of a percent in the predictions move them by well under 1%: within 1%. HCMCL's logits
    are similarity / 0.07, up to 14.3: a 0.2% error in an embedding moves a logit by up to 0.03, the
    loss (a mean of log-softmaxes) by about as much: within 0.05. Training follows the gradient's
    direction: its cosine similarity to float32's above 0.999 for the whole gradient and above 0.98 for
    every tensor (the smallest, 64-value biases, are the noisiest)."""
    cfg, x = fixture_config(ref), ref["inputs"]
    model = load_weights(HiCMAE(cfg).eval(), ref["pretrain_state_dict"])
    entered = []  # what enters the losses: (name, dtype of the input, dtype of the target)
    for name in ("mse_loss", "cross_entropy"):
        real = getattr(torch.nn.functional, name)
        monkeypatch.setattr(torch.nn.functional, name,
                            lambda a, b, *args, _real=real, _name=name, **kwargs:
                            entered.append((_name, a.dtype, b.dtype)) or _real(a, b, *args, **kwargs))

    _, fp32, grads32 = losses_and_grads(model, x, cfg, bf16=False)
    entered.clear()
    out, bf16, grads16 = losses_and_grads(model, x, cfg, bf16=True)
    assert out["video_pred"].dtype == torch.bfloat16  # autocast did run the model in bf16
    assert {name for name, _, _ in entered} == {"mse_loss", "cross_entropy"}
    assert all(a == torch.float32 for _, a, _ in entered), entered  # predictions and HCMCL logits
    assert all(b == torch.float32 for name, _, b in entered if name == "mse_loss"), entered  # targets
    assert_bf16_close(fp32, grads32, bf16, grads16)


def losses_and_grads(model, x, cfg, bf16):
    """The pre-training losses and every parameter's gradient, under bf16 autocast or not, on the inputs' device."""
    model.zero_grad()
    with torch.autocast(x["video"].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x["video"], x["audio"], x["video_mask"], x["audio_mask"])
        losses = pretrain_loss(out, x["video"], x["audio"], x["video_mask"], x["audio_mask"], cfg)
    losses["loss"].backward()
    return out, losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_bf16_close(fp32, grads32, bf16, grads16):
    """The bounds of the test above (its docstring says why; tests/test_gpu.py uses them on CUDA): float32
    losses, the reconstruction losses within 1%, HCMCL within 0.05, the gradient's cosine similarity to
    float32's above 0.999 overall and above 0.98 for every tensor."""
    for k in ("loss", "loss_video", "loss_audio", "loss_hcmcl"):
        assert bf16[k].dtype == torch.float32, k
    for k in ("loss", "loss_video", "loss_audio"):
        assert bf16[k].item() == pytest.approx(fp32[k].item(), rel=0.01), k
    assert bf16["loss_hcmcl"].item() == pytest.approx(fp32["loss_hcmcl"].item(), abs=0.05)
    assert all(torch.isfinite(g).all() for g in grads16.values())
    cosine = torch.nn.functional.cosine_similarity
    flat32, flat16 = (torch.cat([g[n].flatten() for n in grads32]) for g in (grads32, grads16))
    assert cosine(flat16, flat32, dim=0) > 0.999
    per_tensor = {n: cosine(grads16[n].flatten(), grads32[n].flatten(), dim=0).item() for n in grads32}
    worst = min(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] > 0.98, (worst, per_tensor[worst])


def test_bf16_autocast_finetuning_logits_stay_near_the_reference(ref):
    """The fine-tuning model under CPU autocast against the authors' float32 logits: within 2% of their
    range (a few bf16 roundings of 0.2% each, through the same layers as above)."""
    cfg, x = fixture_config(ref), ref["inputs"]
    model = HiCMAEClassifier(cfg, "av", ref["config"]["num_classes"]).eval()
    load_weights(model, ref["finetune_state_dict"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x["video"], x["audio"])
    expected = ref["finetune_outputs"]["logits"]
    assert logits.dtype == torch.bfloat16  # autocast did run the model in bf16
    err = (logits.float() - expected).abs().max().item()
    assert err <= 0.02 * (expected.max() - expected.min()).item(), err


def test_authors_pretraining_checkpoint_gives_the_fixtures_configuration(ref):
    """Their pre-training arguments (encoder_depth, encoder_fusion_depth, window_size,
    return_intermediate_features, ...) and weights give the fixture's geometry and selected layers."""
    checkpoint = load_checkpoint(beside_fixture("checkpoint-99.pth"))
    cfg, modality, num_outputs = authors_config(checkpoint["args"], model_state(checkpoint), heads=ref["config"]["heads"])
    expected = fixture_config(ref)
    for name in ("img_size", "num_frames", "tubelet_size", "patch_size", "audio_frames", "mel_bins", "dim", "depth",
                 "fusion_depth", "inter_layers"):
        assert getattr(cfg, name) == getattr(expected, name), name
    assert (modality, num_outputs) == ("av", None)
