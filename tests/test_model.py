"""The model's promises beyond parity: sizes and costs, gradients under every ablation, safe loading."""
import argparse
import math
from pathlib import Path

import pytest
import torch

from model import (FUSION_FLOWS, SIZES, Encoder, HiCMAE, HiCMAEClassifier, authors_config,
                   convert_official, count_macs, count_params, load_checkpoint, load_weights, make_config,
                   param_groups, pretrain_loss, sincos_table)

# The paper's Tables 2-12 (parameters and MACs; the authors' code gives the same)
PAPER_PARAMS = {  # millions: A+V fine-tuning (6 classes), video encoder, audio encoder, pre-training
    "tiny": (20.47, 8.29, 7.96, 22.75),
    "small": (45.65, 18.33, 17.84, 50.58),
    "base": (80.79, 32.31, 31.65, 99.61),
}
REFERENCE_KEYS = Path(__file__).parent / "fixtures" / "official_keys_base.txt"
PAPER_MACS = {"tiny": (13.8, 9.9, 1.10), "small": (27.6, 19.5, 2.40), "base": (46.1, 32.3, 4.21)}  # G: A+V, V, A


def small_config(**overrides):
    base = dict(img_size=32, num_frames=4, audio_frames=32, mel_bins=32, dim=32, heads=2, depth=4,
                decoder_dim=16, decoder_heads=2, inter_layers=(0, 2, 3), video_mask_ratio=0.5, audio_mask_ratio=0.5)
    return make_config("tiny", **{**base, **overrides})


def masks(cfg, batch):
    """Tube mask for video, random for audio, with the configured ratios."""
    t, s = cfg.video_grid
    video = torch.zeros(batch, t, s, dtype=torch.bool)
    audio = torch.zeros(batch, cfg.num_audio_tokens, dtype=torch.bool)
    for b in range(batch):
        video[b, :, torch.randperm(s)[: int(cfg.video_mask_ratio * s)]] = True
        audio[b, torch.randperm(cfg.num_audio_tokens)[: int(cfg.audio_mask_ratio * cfg.num_audio_tokens)]] = True
    return video.flatten(1), audio


def inputs(cfg, batch):
    return (torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size),
            torch.randn(batch, 1, cfg.audio_frames, cfg.mel_bins))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_parameters_and_macs_equal_the_paper(size):
    cfg = make_config(size)
    av, video, audio, pretrain = PAPER_PARAMS[size]
    assert round(count_params(HiCMAEClassifier(cfg, "av", 6)) / 1e6, 2) == av
    assert round(count_params(Encoder(cfg, "video")) / 1e6, 2) == video
    assert round(count_params(Encoder(cfg, "audio")) / 1e6, 2) == audio
    assert round(count_params(HiCMAE(cfg)) / 1e6, 2) == pretrain
    macs_av, macs_v, macs_a = PAPER_MACS[size]
    assert round(count_macs(cfg, "av") / 1e9, 1) == macs_av
    assert round(count_macs(cfg, "video") / 1e9, 1) == macs_v
    assert round(count_macs(cfg, "audio") / 1e9, 2) == macs_a


def test_base_pretraining_costs_about_30_gflop_forward():
    flops = 2 * count_macs(make_config("base"), "pretrain")
    assert 29e9 < flops < 31e9


def test_sinusoidal_table_is_interleaved():
    table = sincos_table(7, 6)[0]
    for p in range(7):
        for j in range(6):
            angle = p / 10000 ** (2 * (j // 2) / 6)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[p, j].item() == pytest.approx(expected, abs=1e-6)
    assert "pos_embed" not in "".join(HiCMAE(small_config()).state_dict())


SWITCHES = [dict(), dict(skip_connections=False), dict(hcmcl_weight=0.0),
            dict(skip_connections=False, hcmcl_weight=0.0, inter_layers=(1,)), dict(fusion_depth=0),
            dict(fusion_depth=1), dict(depth=3, inter_layers=(0, 1, 2))] + \
           [dict(fusion_flow=f) for f in FUSION_FLOWS[1:]]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_pretraining_backward_reaches_every_parameter(switches):
    cfg = small_config(drop_path=0.1, **switches)
    torch.manual_seed(0)
    model = HiCMAE(cfg).train()
    video, audio = inputs(cfg, 3)
    video_mask, audio_mask = masks(cfg, 3)
    out = model(video, audio, video_mask, audio_mask)
    pretrain_loss(out, video, audio, video_mask, audio_mask, cfg)["loss"].backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unreached, f"no gradient for {unreached}"


def graphs_and_breaks(fn, *args):
    """What torch.compile(fn) would capture, traced by dynamo without compiling (fast on CPU)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count, [r.reason for r in explained.break_reasons]


def forward_and_loss(model, video, audio, video_mask, audio_mask):
    return pretrain_loss(model(video, audio, video_mask, audio_mask), video, audio, video_mask, audio_mask, model.cfg)


# Every size (their widths, on small inputs), ablation switch and fusion flow, a few at a time (a trace takes seconds)
ONE_GRAPH = [dict(size="base", drop_path=0.1), dict(size="small", skip_connections=False, fusion_flow="raw-input"),
             dict(hcmcl_weight=0.0, fusion_flow="video-first"), dict(fusion_flow="audio-first", fusion_depth=1),
             dict(skip_connections=False, hcmcl_weight=0.0, inter_layers=(1,), fusion_depth=0)]


def one_graph_config(size="tiny", **switches):  # a preset's widths and heads on small inputs
    return small_config(**SIZES[size], **switches)


@pytest.mark.parametrize("switches", ONE_GRAPH, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_pretraining_forward_and_loss_are_one_graph(switches):
    """The visible and masked token counts come from the configuration: no Tensor.item(), no graph break."""
    cfg = one_graph_config(**switches)
    model = HiCMAE(cfg).train()
    video, audio = inputs(cfg, 2)
    assert graphs_and_breaks(forward_and_loss, model, video, audio, *masks(cfg, 2)) == (1, 0, [])


@pytest.mark.parametrize("modality,switches", [("av", dict(size="base", drop_path=0.1)),
                                               ("av", dict(hierarchical_fusion=False, fusion_flow="raw-input")),
                                               ("av", dict(fusion_depth=0)), ("video", {}), ("audio", {})], ids=str)
def test_finetuning_forward_is_one_graph(modality, switches):
    cfg = one_graph_config(**switches)
    model = HiCMAEClassifier(cfg, modality, 3).train()
    video, audio = inputs(cfg, 2)
    assert graphs_and_breaks(model, video if modality != "audio" else None,
                             audio if modality != "video" else None) == (1, 0, [])


@pytest.mark.parametrize("modality", ["av", "video", "audio"])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_finetuning_backward_reaches_every_parameter(modality, hierarchical):
    cfg = small_config(hierarchical_fusion=hierarchical, drop_path=0.1)
    model = HiCMAEClassifier(cfg, modality, 3).train()
    video, audio = inputs(cfg, 2)
    logits = model(video if modality != "audio" else None, audio if modality != "video" else None)
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unreached, f"no gradient for {unreached}"
    assert hasattr(model, "video_layer_weights") == (hierarchical and modality != "audio")


def test_hierarchical_feature_fusion_weights_layers():
    """Eq. 12: uniform weights give the mean over layers; one dominant weight selects that layer."""
    cfg = small_config()
    model = HiCMAEClassifier(cfg, "video", 2).eval()
    video, _ = inputs(cfg, 1)
    with torch.no_grad():
        _, layers = model.video_encoder(video, return_layers=range(cfg.depth))
        pooled = torch.stack([f.mean(1) for f in layers], 1)
        _, uniform, every_layer = model.unimodal(model.video_encoder, video, model.video_layer_weights)
        torch.testing.assert_close(uniform, pooled.mean(1))
        torch.testing.assert_close(every_layer, pooled)
        model.video_layer_weights[2] = 50.0
        _, third, _ = model.unimodal(model.video_encoder, video, model.video_layer_weights)
        torch.testing.assert_close(third, pooled[:, 2])


def test_layer_decay_groups():
    cfg = small_config()  # depth 4, fusion 2: 7 layer ids
    model = HiCMAEClassifier(cfg, "av", 3)
    assert model.layer_id("video_encoder.patch_embed.weight") == 0
    assert model.layer_id("audio_encoder.blocks.2.attn.qkv.weight") == 3
    assert model.layer_id("fusion.audio_blocks.1.mlp.fc1.weight") == 6
    assert model.layer_id("fusion.video_norm.weight") == 7
    assert model.layer_id("head.weight") == 7
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.75 ** (7 - g["layer_id"]))
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == (p.ndim >= 2), names[id(p)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["lr_scale"] == 1.0 for g in param_groups(HiCMAE(cfg), 0.05))  # no layer decay in pre-training


def test_mask_tokens_are_not_decayed():
    model = HiCMAE(small_config())
    decayed = {id(p) for g in param_groups(model, 0.05) if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.video_decoder.mask_token) not in decayed and id(model.audio_decoder.mask_token) not in decayed
    assert id(model.video_decoder.embed.weight) in decayed


def test_loading_errors_name_the_key():
    cfg = small_config()
    state = HiCMAE(cfg).state_dict()
    bad = dict(state)
    bad["video_encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="video_encoder.blocks.0.mlp.fc1.weight"):
        load_weights(HiCMAE(cfg), bad)
    extra = dict(state, **{"something.else": torch.zeros(1)})
    with pytest.raises(KeyError, match="something.else"):
        load_weights(HiCMAE(cfg), extra)
    missing = {k: v for k, v in state.items() if not k.startswith("fusion.video_blocks.0.")}
    with pytest.raises(KeyError, match="fusion.video_blocks.0"):
        load_weights(HiCMAEClassifier(cfg, "av", 3), missing)


def test_pretraining_weights_into_each_classifier():
    cfg = small_config()
    pretrained = HiCMAE(cfg)
    for modality in ("av", "audio", "video"):
        messages = []
        model = load_weights(HiCMAEClassifier(cfg, modality, 4), pretrained.state_dict(), log=messages.append)
        encoder = model.audio_encoder if modality == "audio" else model.video_encoder
        source = pretrained.audio_encoder if modality == "audio" else pretrained.video_encoder
        assert torch.equal(encoder.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
        assert messages and "head" in messages[-1]


def test_official_key_names_convert_to_ours():
    lines = REFERENCE_KEYS.read_text().splitlines()
    rows = [line.split() for line in lines if line.startswith(("pretrain ", "finetune "))]
    keys, kinds = [row[1] for row in rows], [row[0] for row in rows]
    cfg = make_config("base")
    ours = {"pretrain": set(HiCMAE(cfg).state_dict()), "finetune": set(HiCMAEClassifier(cfg, "av", 6).state_dict())}
    for kind in ("pretrain", "finetune"):
        theirs = {k: torch.zeros(0) for k, c in zip(keys, kinds) if c == kind}
        assert set(convert_official(theirs)) == ours[kind]


def test_refuses_a_checkpoint_that_pickles_a_callable(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_checkpoint(path)
    assert not marker.exists()


def test_authors_config_reads_their_arguments_and_takes_the_heads_from_the_width():
    """Their CREMA-D script's flags with a width-384 model (heads 6 by their model names)."""
    args = argparse.Namespace(model="avit_dim384_patch16_160_a256", input_size=112, num_frames=8,
                              input_size_audio=128, num_mel_bins=64, depth=6, depth_audio=6, fusion_depth=1,
                              nb_classes=7, sampling_rate=4, test_num_segment=2, test_num_crop=2)
    state = {"encoder.patch_embed.proj.weight": torch.zeros(384, 3, 2, 16, 16),
             "encoder_audio.patch_embed.proj.weight": torch.zeros(384, 1, 16, 16),
             "video_layer_weights": torch.zeros(6), "audio_layer_weights": torch.zeros(6),
             "head.weight": torch.zeros(7, 4 * 384)}
    cfg, modality, num_outputs = authors_config(args, state)
    assert (cfg.img_size, cfg.num_frames, cfg.audio_frames, cfg.mel_bins) == (112, 8, 128, 64)
    assert (cfg.dim, cfg.heads, cfg.depth, cfg.fusion_depth, cfg.hierarchical_fusion) == (384, 6, 6, 1, True)
    assert (modality, num_outputs) == ("av", 7)
    assert authors_config(args, state, heads=12, depth=None)[0].heads == 12  # a flag wins; None is no flag
    narrow = {**state, "encoder.patch_embed.proj.weight": torch.zeros(64, 3, 2, 16, 16),
              "encoder_audio.patch_embed.proj.weight": torch.zeros(64, 1, 16, 16)}
    with pytest.raises(ValueError, match="--heads"):  # no model name of theirs has width 64
        authors_config(args, narrow)
    with pytest.raises(ValueError, match="one depth"):
        authors_config(argparse.Namespace(**{**vars(args), "depth_audio": 4}), state)


def test_skip_connections_constrain_the_pretraining_model_only():
    """One selected layer per decoder layer after the first is the decoders' rule: a fine-tuning model of 2
    layers with one selected layer builds, the pre-training model with its 4 decoder layers refuses it."""
    cfg = small_config(depth=2, inter_layers=(1,))
    logits = HiCMAEClassifier(cfg, "av", num_outputs=3)(torch.randn(1, 3, 4, 32, 32), torch.randn(1, 1, 32, 32))
    assert logits.shape == (1, 3)
    with pytest.raises(AssertionError, match="one selected encoder layer per decoder layer"):
        HiCMAE(cfg)
