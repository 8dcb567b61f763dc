"""HiCMAE (Sun et al., Information Fusion 2024), in the paper's order: configuration, building blocks,
encoders (Sec. 3.1.1-3.1.2), decoders (Sec. 3.1.3), pre-training losses (Eq. 8-11), fine-tuning model
(Eq. 12), optimiser groups and costs, checkpoints. `python model.py` prints the size of every model."""

import argparse
import pickle
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FUSION_FLOWS = ("default", "raw-input", "video-first", "audio-first")
FEATURE_PARTS = ("video", "audio", "fused_video", "fused_audio")  # the fine-tuning feature, in order (Eq. 12)


# ----------------------------------------------------------------------------------------------
# 0. Configuration

@dataclass
class HiCMAEConfig:
    # inputs: video (3, num_frames, img_size, img_size), audio (1, audio_frames, mel_bins)
    img_size: int = 160
    num_frames: int = 16
    tubelet_size: int = 2
    patch_size: int = 16
    audio_frames: int = 256
    mel_bins: int = 128
    # encoders: width C, heads H, Ns modality-specific layers, Nf fusion layers
    dim: int = 512
    heads: int = 8
    depth: int = 10
    fusion_depth: int = 2
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    fusion_flow: str = "default"
    # decoders: width Cd, heads, Nd layers; selected encoder layers (0-based) for skips and HCMCL
    decoder_dim: int = 384
    decoder_heads: int = 6
    decoder_depth: int = 4
    inter_layers: tuple = (3, 6, 9)
    skip_connections: bool = True
    # pre-training objective
    video_mask_ratio: float = 0.9
    audio_mask_ratio: float = 0.8
    temperature: float = 0.07
    hcmcl_weight: float = 0.0025
    normalize_target: bool = True
    frame_diff_target: bool = True
    # fine-tuning
    hierarchical_fusion: bool = True

    def __post_init__(self):
        self.inter_layers = tuple(int(i) for i in self.inter_layers)
        assert self.fusion_flow in FUSION_FLOWS, f"fusion_flow must be one of {FUSION_FLOWS}"
        assert all(0 <= i < self.depth for i in self.inter_layers), "inter_layers must index encoder blocks"
        assert len(set(self.inter_layers)) == len(self.inter_layers), "inter_layers must be distinct"
        assert self.img_size % self.patch_size == 0 and self.num_frames % self.tubelet_size == 0
        assert self.audio_frames % self.patch_size == 0 and self.mel_bins % self.patch_size == 0

    @property
    def video_grid(self):  # (temporal, spatial) token counts
        return self.num_frames // self.tubelet_size, (self.img_size // self.patch_size) ** 2

    @property
    def num_video_tokens(self):
        t, s = self.video_grid
        return t * s

    @property
    def num_audio_tokens(self):
        return (self.audio_frames // self.patch_size) * (self.mel_bins // self.patch_size)

    @property
    def num_visible(self):  # visible tokens per modality during pre-training (Sec. 3.1.1: masking)
        t, s = self.video_grid
        n = self.num_audio_tokens
        return t * (s - int(self.video_mask_ratio * s)), n - int(self.audio_mask_ratio * n)


SIZES = {  # HiCMAE-T / S / B (paper Sec. 4.1); the authors publish no decoder for T, 128/2 is ours
    "tiny": dict(dim=256, heads=4, decoder_dim=128, decoder_heads=2),
    "small": dict(dim=384, heads=6, decoder_dim=192, decoder_heads=3),
    "base": dict(dim=512, heads=8, decoder_dim=384, decoder_heads=6),
}


def make_config(size="base", **overrides):
    """A named size with any field overridden, e.g. make_config("tiny", img_size=64)."""
    return HiCMAEConfig(**{**SIZES[size], **overrides})


# ----------------------------------------------------------------------------------------------
# 1. Building blocks

def sincos_table(num_positions, dim):
    """Fixed sinusoidal positions: angle = p / 10000^(2*floor(j/2)/dim); sin on even, cos on odd channels."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]  # (1, N, dim)


def gather_tokens(x, ids):
    """x (B, N, C), ids (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def split_mask(mask, num_visible):
    """Mask (B, N), True = masked -> (visible ids, masked ids) in token order. num_visible comes from the
    configuration (data.PretrainDataset masks with it): reading it from the mask would be a host sync."""
    ids = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return ids[:, :num_visible], ids[:, num_visible:]


def drop_path(x, p, training):
    """Stochastic depth: drop a sample's residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """MHSA (Eq. 2), or with cross=True MHCA (Eq. 4): queries from x, keys and values from ctx.
    q and v carry a bias, k none (a k-bias cannot change the softmax)."""

    def __init__(self, dim, heads, cross=False):
        super().__init__()
        self.heads = heads
        if cross:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        B, N, C = x.shape
        zeros = torch.zeros_like(self.v_bias)
        if ctx is None:
            qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, zeros, self.v_bias]))
            q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        else:
            q = F.linear(x, self.q.weight, self.q_bias).view(B, N, self.heads, C // self.heads).transpose(1, 2)
            kv = F.linear(ctx, self.kv.weight, torch.cat([zeros, self.v_bias]))
            k, v = kv.view(B, ctx.shape[1], 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/H)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    """FFN (Eq. 3): Linear, exact GELU, Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class Block(nn.Module):
    """Pre-norm Transformer layer (Eq. 1): x += MHSA(LN x); x += FFN(LN x)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = layer_norm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class CrossBlock(Block):
    """MHCA then MHSA then FFN (Eq. 5-7): x += MHCA(LN x, LN ctx), then a Block."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__(dim, heads, mlp_ratio, drop_path)
        self.norm_q = layer_norm(dim)
        self.norm_ctx = layer_norm(dim)
        self.cross_attn = Attention(dim, heads, cross=True)

    def forward(self, x, ctx):
        x = x + drop_path(self.cross_attn(self.norm_q(x), self.norm_ctx(ctx)), self.drop_path, self.training)
        return super().forward(x)


def drop_path_rates(rate, depth):
    return [rate * i / max(depth - 1, 1) for i in range(depth)]  # linear from 0 to rate


# ----------------------------------------------------------------------------------------------
# 2. Encoders

class Encoder(nn.Module):
    """Modality-specific encoder (Sec. 3.1.1): patch embedding, sinusoidal positions, Ns layers, LN."""

    def __init__(self, cfg, modality):
        super().__init__()
        self.cfg, self.modality = cfg, modality
        p = cfg.patch_size
        if modality == "video":
            self.patch_embed = nn.Conv3d(3, cfg.dim, (cfg.tubelet_size, p, p), stride=(cfg.tubelet_size, p, p))
            num_tokens = cfg.num_video_tokens
        else:
            self.patch_embed = nn.Conv2d(1, cfg.dim, p, stride=p)
            num_tokens = cfg.num_audio_tokens
        self.register_buffer("pos_embed", sincos_table(num_tokens, cfg.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, r)
                                    for r in drop_path_rates(cfg.drop_path, cfg.depth))
        self.norm = layer_norm(cfg.dim)

    def forward(self, x, visible_ids=None, return_layers=()):
        """norm(output) and norm(output of block j) for j in return_layers (0-based)."""
        if visible_ids is None:
            x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        else:  # pre-training: embed only the visible tokens (the convolution as a matrix product), in order
            # each token's pixels in the weight's (channel, time, row, column) order
            patches = (patchify_video(x, self.cfg).transpose(2, 3).flatten(2) if self.modality == "video" else
                       patchify_audio(x, self.cfg))
            weight = self.patch_embed.weight.flatten(1)
            x = F.linear(gather_tokens(patches, visible_ids), weight, self.patch_embed.bias)
            x = x + self.pos_embed[0][visible_ids]
        layers = []
        for j, block in enumerate(self.blocks):
            x = block(x)
            if j in return_layers:
                layers.append(self.norm(x))  # intermediate features share the final norm
        return self.norm(x), layers


class FusionEncoder(nn.Module):
    """Cross-modal fusion encoder (Sec. 3.1.2): Nf layers of MHCA + MHSA + FFN per modality."""

    def __init__(self, cfg):
        super().__init__()
        rates = drop_path_rates(cfg.drop_path, cfg.fusion_depth)
        self.flow = cfg.fusion_flow
        self.video_blocks = nn.ModuleList(CrossBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.audio_blocks = nn.ModuleList(CrossBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.video_norm = layer_norm(cfg.dim)
        self.audio_norm = layer_norm(cfg.dim)

    def forward(self, v, a):
        v_in, a_in = v, a
        for video_block, audio_block in zip(self.video_blocks, self.audio_blocks):
            if self.flow == "default":  # Eq. 5-6: both from the inputs of this layer
                v, a = video_block(v, a), audio_block(a, v)
            elif self.flow == "raw-input":  # always attend to the other modality's encoder output
                v, a = video_block(v, a_in), audio_block(a, v_in)
            elif self.flow == "video-first":
                v = video_block(v, a)
                a = audio_block(a, v)
            else:  # audio-first
                a = audio_block(a, v)
                v = video_block(v, a)
        return self.video_norm(v), self.audio_norm(a)


# ----------------------------------------------------------------------------------------------
# 3. Decoders with hierarchical skip connections

class Decoder(nn.Module):
    """Decoder (Sec. 3.1.3, Eq. 7): a Block, then CrossBlocks attending to the selected encoder layers,
    deepest first (U-Net order, as the released weights were trained)."""

    def __init__(self, cfg, num_tokens, out_dim):
        super().__init__()
        d = cfg.decoder_dim
        self.embed = nn.Linear(cfg.dim, d, bias=False)  # encoder_to_decoder, shared by the skips
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.register_buffer("pos_embed", sincos_table(num_tokens, d), persistent=False)
        rates = drop_path_rates(cfg.drop_path, cfg.decoder_depth)
        layer = CrossBlock if cfg.skip_connections else Block
        self.blocks = nn.ModuleList([Block(d, cfg.decoder_heads, cfg.mlp_ratio, rates[0])] +
                                    [layer(d, cfg.decoder_heads, cfg.mlp_ratio, r) for r in rates[1:]])
        self.norm = layer_norm(d)
        self.head = nn.Linear(d, out_dim)

    def forward(self, x, skips, visible_ids, masked_ids):
        pos = self.pos_embed[0]
        pos_visible, pos_masked = pos[visible_ids], pos[masked_ids]
        x = torch.cat([self.embed(x) + pos_visible, self.mask_token + pos_masked], dim=1)
        skips = [self.embed(s) + pos_visible for s in reversed(skips)]
        for k, block in enumerate(self.blocks):
            x = block(x, skips[k - 1]) if isinstance(block, CrossBlock) else block(x)
        return self.head(self.norm(x[:, -masked_ids.shape[1]:]))  # the masked tokens only


# ----------------------------------------------------------------------------------------------
# 4. Pre-training model, targets and losses

class HiCMAE(nn.Module):
    """The pre-training model; masks True = masked, leaving cfg.num_visible tokens (data.PretrainDataset's)."""

    def __init__(self, cfg):
        super().__init__()
        assert not cfg.skip_connections or len(cfg.inter_layers) == cfg.decoder_depth - 1, \
            "one selected encoder layer per decoder layer after the first"
        self.cfg = cfg
        self.video_encoder = Encoder(cfg, "video")
        self.audio_encoder = Encoder(cfg, "audio")
        self.fusion = FusionEncoder(cfg) if cfg.fusion_depth > 0 else None
        p = cfg.patch_size
        self.video_decoder = Decoder(cfg, cfg.num_video_tokens, cfg.tubelet_size * p * p * 3)
        self.audio_decoder = Decoder(cfg, cfg.num_audio_tokens, p * p)
        init_weights(self)

    def forward(self, video, audio, video_mask, audio_mask):
        cfg = self.cfg
        v_visible, v_masked = split_mask(video_mask, cfg.num_visible[0])
        a_visible, a_masked = split_mask(audio_mask, cfg.num_visible[1])
        layers = cfg.inter_layers if cfg.skip_connections or cfg.hcmcl_weight > 0 else ()
        v, v_layers = self.video_encoder(video, v_visible, layers)
        a, a_layers = self.audio_encoder(audio, a_visible, layers)
        # HCMCL embeddings (Eq. 9): mean over visible tokens of each selected layer, L2-normalised
        video_emb = torch.stack([F.normalize(f.mean(1), dim=-1) for f in v_layers]) if v_layers else None
        audio_emb = torch.stack([F.normalize(f.mean(1), dim=-1) for f in a_layers]) if a_layers else None
        if self.fusion is not None:
            v, a = self.fusion(v, a)
        skips_v, skips_a = (v_layers, a_layers) if cfg.skip_connections else ([], [])
        return dict(video_pred=self.video_decoder(v, skips_v, v_visible, v_masked),
                    audio_pred=self.audio_decoder(a, skips_a, a_visible, a_masked),
                    video_emb=video_emb, audio_emb=audio_emb)


def patchify_video(video, cfg):
    """(B, 3, T, H, W) -> (B, N, tubelet*p*p, 3), pixels of each token in (frame, row, column) order."""
    B, C, T, H, W = video.shape
    t, p = cfg.tubelet_size, cfg.patch_size
    x = video.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, -1, t * p * p, C)


def unpatchify_video(patches, cfg):
    """Inverse of patchify_video: (B, N, tubelet*p*p*3) -> (B, 3, T, H, W)."""
    B = patches.shape[0]
    t, p, g = cfg.tubelet_size, cfg.patch_size, cfg.img_size // cfg.patch_size
    x = patches.reshape(B, cfg.num_frames // t, g, g, t, p, p, 3).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size)


def patchify_audio(audio, cfg):
    """(B, 1, T, F) -> (B, N, p*p), tokens in (time, frequency) order."""
    B, _, T, Fq = audio.shape
    p = cfg.patch_size
    return audio.reshape(B, T // p, p, Fq // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)


def unpatchify_audio(patches, cfg):
    B, p = patches.shape[0], cfg.patch_size
    x = patches.reshape(B, cfg.audio_frames // p, cfg.mel_bins // p, p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B, 1, cfg.audio_frames, cfg.mel_bins)


def normalize_patches(x):
    """Per token (and channel): zero mean, unit unbiased std over its pixels (dim -2)."""
    return (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)


def to_pixels(video):
    """ImageNet-normalised video (B, 3, T, H, W) back to pixels in [0, 1]."""
    # filled on the device, not copied from the host (a CUDA graph captures no host copies)
    mean = torch.stack([video.new_full((), m) for m in IMAGENET_MEAN]).view(1, 3, 1, 1, 1)
    std = torch.stack([video.new_full((), s) for s in IMAGENET_STD]).view(1, 3, 1, 1, 1)
    return video * std + mean


def reconstruction_targets(video, audio, video_mask, audio_mask, cfg):
    """Targets of the masked tokens (Eq. 8), in increasing token order."""
    v = patchify_video(to_pixels(video), cfg)
    if cfg.normalize_target:
        v = normalize_patches(v)
    if cfg.frame_diff_target:  # appearance of the first frame, motion (frame difference) for the rest
        B, N, _, C = v.shape
        v = v.reshape(B, N, cfg.tubelet_size, -1, C)
        v = torch.cat([v[:, :, :1], v[:, :, 1:] - v[:, :, :1]], dim=2)
    v = v.reshape(v.shape[0], v.shape[1], -1)
    a = patchify_audio(audio, cfg)
    if cfg.normalize_target:
        a = normalize_patches(a[..., None])[..., 0]
    return (gather_tokens(v, split_mask(video_mask, cfg.num_visible[0])[1]),
            gather_tokens(a, split_mask(audio_mask, cfg.num_visible[1])[1]))


class GatherBatch(torch.autograd.Function):
    """All ranks' (L, B, C) along the batch; the backward sums all ranks' gradients, keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad.chunk(torch.distributed.get_world_size(), dim=1)[torch.distributed.get_rank()]


def hcmcl_loss(video_emb, audio_emb, temperature, gather=False):
    """HCMCL (Eq. 9-10): symmetric InfoNCE per selected layer (L, B, C), summed; negatives from the local
    batch as the authors, or from every rank (gather). Returns the loss and each layer's accuracy (L,)."""
    B = video_emb.shape[1]
    labels = torch.arange(B, device=video_emb.device)
    audio_all, video_all = audio_emb, video_emb
    if gather:
        audio_all, video_all = GatherBatch.apply(audio_emb), GatherBatch.apply(video_emb)
        labels = labels + torch.distributed.get_rank() * B
    logits_v = video_emb @ audio_all.transpose(1, 2) / temperature  # (L, B, B_all)
    logits_a = audio_emb @ video_all.transpose(1, 2) / temperature
    loss = sum(0.5 * (F.cross_entropy(lv, labels) + F.cross_entropy(la, labels))
               for lv, la in zip(logits_v, logits_a))
    with torch.no_grad():
        hits_v = (logits_v.argmax(-1) == labels).float().mean(-1)
        acc = 0.5 * (hits_v + (logits_a.argmax(-1) == labels).float().mean(-1))
    return loss, acc


def pretrain_loss(out, video, audio, video_mask, audio_mask, cfg, gather=False):
    """L = MSE_video + MSE_audio + lambda * HCMCL (Eq. 8, 11) and its parts, in float32 (bf16 logits near
    1 / 0.07 = 14.3 move in steps of 1/16)."""
    with torch.autocast(video.device.type, enabled=False):
        video_target, audio_target = reconstruction_targets(video.float(), audio.float(), video_mask, audio_mask,
                                                            cfg)
        loss_video = F.mse_loss(out["video_pred"].float(), video_target)
        loss_audio = F.mse_loss(out["audio_pred"].float(), audio_target)
        loss = loss_video + loss_audio
        parts = dict(loss_video=loss_video, loss_audio=loss_audio)
        if cfg.hcmcl_weight > 0:
            parts["loss_hcmcl"], parts["hcmcl_acc"] = hcmcl_loss(out["video_emb"].float(), out["audio_emb"].float(),
                                                                 cfg.temperature, gather)
            loss = loss + cfg.hcmcl_weight * parts["loss_hcmcl"]
    return dict(loss=loss, **parts)


# ----------------------------------------------------------------------------------------------
# 5. Fine-tuning model with hierarchical feature fusion

class HiCMAEClassifier(nn.Module):
    """Encoders without masking, hierarchical feature fusion (Eq. 12), LayerNorm, linear head: modality "av"
    (feature FEATURE_PARTS, 4C), "audio" or "video" (C); num_outputs K classes or D regression targets."""

    def __init__(self, cfg, modality="av", num_outputs=6):
        super().__init__()
        assert modality in ("av", "audio", "video")
        self.cfg, self.modality = cfg, modality
        self.video_encoder = Encoder(cfg, "video") if modality in ("av", "video") else None
        self.audio_encoder = Encoder(cfg, "audio") if modality in ("av", "audio") else None
        self.fusion = FusionEncoder(cfg) if modality == "av" and cfg.fusion_depth > 0 else None
        for m in ("video", "audio") if cfg.hierarchical_fusion else ():  # layer weights (Eq. 12), start uniform
            if getattr(self, f"{m}_encoder") is not None:
                setattr(self, f"{m}_layer_weights", nn.Parameter(torch.full((cfg.depth,), 1.0 / cfg.depth)))
        num_features = cfg.dim * (2 if modality == "av" else 1) * (2 if self.fusion is not None else 1)
        self.fc_norm = layer_norm(num_features)
        self.head = nn.Linear(num_features, num_outputs)
        init_weights(self)

    def unimodal(self, encoder, x, layer_weights):
        """Normed last tokens, the feature sum_j softmax(w)_j mean(E_j) (Eq. 12; without layer weights the last
        layer's mean) and every block's pooled output (B, Ns, C)."""
        last, layers = encoder(x, return_layers=range(len(encoder.blocks)))
        pooled = torch.stack([f.mean(1) for f in layers], dim=1)
        if layer_weights is None:
            return last, pooled[:, -1], pooled
        return last, (pooled * layer_weights.softmax(0)[None, :, None]).sum(1), pooled

    def forward_parts(self, video=None, audio=None):
        """The feature's parts by name (FEATURE_PARTS) and each encoder's pooled layers ("video_layers",
        "audio_layers", (B, Ns, C)), which the frozen-feature probes read."""
        parts, tokens = {}, {}
        for m, x in (("video", video), ("audio", audio)):
            encoder = getattr(self, f"{m}_encoder")
            if encoder is not None:
                weights = getattr(self, f"{m}_layer_weights", None)
                tokens[m], parts[m], parts[f"{m}_layers"] = self.unimodal(encoder, x, weights)
        if self.fusion is not None:
            v, a = self.fusion(tokens["video"], tokens["audio"])
            parts["fused_video"], parts["fused_audio"] = v.mean(1), a.mean(1)
        return parts

    def forward_features(self, video=None, audio=None):
        parts = self.forward_parts(video, audio)
        return self.fc_norm(torch.cat([parts[k] for k in FEATURE_PARTS if k in parts], dim=-1))

    def forward(self, video=None, audio=None):
        return self.head(self.forward_features(video, audio))

    def num_layers(self):  # patch embeddings, Ns encoder layers, Nf fusion layers, the rest
        return self.cfg.depth + (self.cfg.fusion_depth if self.fusion is not None else 0) + 2

    def layer_id(self, name):
        """Layer for lr decay: 0 patch embeddings, j+1 encoder block j, Ns+j+1 fusion layer j, then the rest."""
        if ".patch_embed." in name:
            return 0
        m = re.match(r"(video|audio)_encoder\.blocks\.(\d+)\.", name)
        if m:
            return int(m.group(2)) + 1
        m = re.match(r"fusion\.(video|audio)_blocks\.(\d+)\.", name)
        if m:
            return self.cfg.depth + int(m.group(2)) + 1
        return self.num_layers() - 1


def init_weights(model):
    """Xavier-uniform linear layers with zero bias, unit LayerNorms (the authors' initialisation)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 6. Optimiser groups, sizes and costs

def param_groups(model, weight_decay, layer_decay=1.0):
    """AdamW groups: decay on matrices but mask tokens; lr_scale = layer_decay^(L-1-layer_id) (fine-tuning)."""
    groups = {}
    num_layers = model.num_layers() if layer_decay != 1.0 else 1
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "mask_token" not in name
        lid = model.layer_id(name) if layer_decay != 1.0 else 0
        key = (lid, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0,
                               lr_scale=layer_decay ** (num_layers - 1 - lid), layer_id=lid)
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def configure_optimizer(model, lr, weight_decay, betas, layer_decay=1.0, device_type="cpu"):
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=betas,
                             fused=device_type == "cuda")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(cfg, model="av", num_outputs=6):
    """Multiply-accumulates per clip of the model "av" (the classifier), "audio" or "video" (the encoder) or
    "pretrain": torch's FlopCounterMode counts its matrix products and convolutions (2 FLOPs per MAC) on the
    meta device, from the shapes alone."""
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        video = torch.zeros(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
        audio = torch.zeros(1, 1, cfg.audio_frames, cfg.mel_bins)
        if model == "pretrain":
            masks = [torch.zeros(1, n, dtype=torch.bool) for n in (cfg.num_video_tokens, cfg.num_audio_tokens)]
            HiCMAE(cfg)(video, audio, *masks)
        elif model == "av":
            HiCMAEClassifier(cfg, "av", num_outputs)(video, audio)
        else:
            Encoder(cfg, model)(video if model == "video" else audio)
    return counter.get_total_flops() // 2


def size_table():
    """Parameters (M) and MACs per clip (G) of every size as the paper's tables (unimodal: the encoder)."""
    lines = [f"{'size':6} {'model':14} {'params (M)':>11} {'MACs (G)':>9}"]
    for size in SIZES:
        cfg = make_config(size)
        with torch.device("meta"):
            rows = [("audio encoder", Encoder(cfg, "audio"), "audio"),
                    ("video encoder", Encoder(cfg, "video"), "video"),
                    ("A+V, 6 classes", HiCMAEClassifier(cfg, "av", 6), "av"),
                    ("pre-training", HiCMAE(cfg), "pretrain")]
        for name, m, kind in rows:
            lines.append(f"{size:6} {name:14} {count_params(m) / 1e6:11.2f} {count_macs(cfg, kind) / 1e9:9.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 7. Checkpoints

# The authors' key names -> ours: module paths (first match wins), then names inside the blocks.
OFFICIAL_MODULES = [
    ("encoder.patch_embed.proj.", "video_encoder.patch_embed."),
    ("encoder_audio.patch_embed.proj.", "audio_encoder.patch_embed."),
    ("encoder_fusion.blocks_audio.", "fusion.audio_blocks."),
    ("encoder_fusion.blocks.", "fusion.video_blocks."),
    ("encoder_fusion.norm_audio.", "fusion.audio_norm."),
    ("encoder_fusion.norm.", "fusion.video_norm."),
    ("encoder_audio.", "audio_encoder."),
    ("encoder.", "video_encoder."),
    ("encoder_to_decoder_audio.", "audio_decoder.embed."),
    ("encoder_to_decoder.", "video_decoder.embed."),
    ("mask_token_audio", "audio_decoder.mask_token"),
    ("mask_token", "video_decoder.mask_token"),
    ("decoder_audio.", "audio_decoder."),
    ("decoder.", "video_decoder."),
]
OFFICIAL_INNER = [(".cross_norm1.", ".norm_q."), (".cross_norm2.", ".norm_ctx.")]


def convert_official(state_dict):
    """Rename the keys of an authors' state_dict (pre-training or fine-tuning) to ours."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, ours in OFFICIAL_MODULES:
            if key.startswith(old):
                new = ours + key[len(old):]
                break
        for old, ours in OFFICIAL_INNER:
            new = new.replace(old, ours)
        out[new] = value
    return out


def load_checkpoint(path):
    """Open a checkpoint safely: tensors, plain containers and argparse.Namespace only."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # weights_only refuses other objects before building them
        raise ValueError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                         f"containers ({e})") from None
    except Exception as e:  # a truncated or damaged zip archive, or no PyTorch file at all
        raise ValueError(f"{path}: corrupt: not a complete PyTorch checkpoint (truncated or damaged; "
                         f"{type(e).__name__}: {str(e).splitlines()[0]})") from None


def model_state(checkpoint):
    """The state_dict inside a checkpoint: ours and the authors' keep it under 'model'."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise ValueError("checkpoint holds no state_dict (expected a dict of tensors or a 'model' entry)")


# The authors' saved arguments that set a field of ours: field <- (their names, the first that holds a value wins;
# the value when none does). The weights' shapes give the rest (authors_weights).
AUTHORS_ARGS = {
    "img_size": (["input_size"], 160),
    "num_frames": (["num_frames"], None),  # None: pre-training's window_size x tubelet, else 16
    "audio_frames": (["input_size_audio"], 256),
    "mel_bins": (["num_mel_bins"], 128),
    "depth": (["depth", "encoder_depth"], None),  # the video encoder's
    "depth_audio": (["depth_audio", "encoder_depth_audio"], None),
    "fusion_depth": (["fusion_depth", "encoder_fusion_depth"], 0),
    "inter_layers": (["return_intermediate_features"], None),
    "window_size": (["window_size"], None),  # pre-training's (frames / tubelet, rows, columns)
}
AUTHORS_UNSUPPORTED = ("head_activation_func", "keep_temporal_dim")
MODALITY_OF = {(True, True): "av", (True, False): "video", (False, True): "audio"}  # (video weights?, audio?)


def authors_args(namespace):
    """Their saved arguments by our names (AUTHORS_ARGS); one we do not support is an error."""
    saved = {name: value for name, value in vars(namespace).items() if value is not None}
    if any(saved.get(name) for name in AUTHORS_UNSUPPORTED):
        raise ValueError("the authors' --head_activation_func and --keep_temporal_dim are not supported")
    return {ours: next((saved[name] for name in names if name in saved), default)
            for ours, (names, default) in AUTHORS_ARGS.items()}


def authors_weights(state_dict):
    """What an authors' state_dict's shapes say: (modality, the outputs of its head or None (a pre-training
    checkpoint), config fields: width and by it the heads (only their model names give them: SIZES), patch and
    tubelet sizes, and whether the layers are fused with weights (Eq. 12))."""
    video = state_dict.get("encoder.patch_embed.proj.weight")  # (C, 3, tubelet, patch, patch)
    audio = state_dict.get("encoder_audio.patch_embed.proj.weight")  # (C, 1, patch, patch)
    embed = video if video is not None else audio
    head = state_dict.get("head.weight")
    by_width = next((preset for preset in SIZES.values() if preset["dim"] == embed.shape[0]), dict(heads=None))
    geometry = dict(by_width, dim=embed.shape[0], patch_size=embed.shape[-1],
                    tubelet_size=2 if video is None else video.shape[2],
                    # a pre-trained model is fine-tuned with the layer weights (Eq. 12), so it is probed with them
                    hierarchical_fusion=head is None or any(k.endswith("layer_weights") for k in state_dict))
    return MODALITY_OF[video is not None, audio is not None], None if head is None else head.shape[0], geometry


def authors_config(namespace, state_dict, **overrides):
    """(HiCMAEConfig, modality, num_outputs) of an authors' fine-tuned (checkpoint-best.pth) or pre-trained
    (checkpoint-99.pth, num_outputs None) model, from their saved arguments and the weights' shapes. The heads
    are not saved: their model names give them by width (SIZES). `overrides` (None ignored) win."""
    theirs = authors_args(namespace)
    modality, num_outputs, geometry = authors_weights(state_dict)
    if modality == "av" and theirs["depth_audio"] not in (None, theirs["depth"]):
        raise ValueError(f"video depth {theirs['depth']} and audio depth {theirs['depth_audio']}: one depth is "
                         "supported")
    window = theirs["window_size"]
    config = dict(
        geometry, img_size=theirs["img_size"], audio_frames=theirs["audio_frames"], mel_bins=theirs["mel_bins"],
        num_frames=theirs["num_frames"] or (window[0] * geometry["tubelet_size"] if window else 16),
        depth=theirs["depth"] if modality != "audio" else theirs["depth_audio"] or theirs["depth"],
        fusion_depth=theirs["fusion_depth"] if modality == "av" else 0)
    if theirs["inter_layers"] is not None:
        config["inter_layers"] = tuple(theirs["inter_layers"])
    config.update({k: v for k, v in overrides.items() if v is not None})
    if config["heads"] is None:
        raise ValueError(f"the number of heads of width {config['dim']} is not in the checkpoint, and the "
                         "authors' model names give it only for 256, 384 and 512: pass --heads")
    if any(i >= config["depth"] for i in config.get("inter_layers", HiCMAEConfig.inter_layers)):
        config["inter_layers"] = tuple(range(config["depth"] - 3, config["depth"]))  # unused by the classifier
    return HiCMAEConfig(**config), modality, num_outputs


def checkpoint_config(checkpoint, **overrides):
    """(HiCMAEConfig, run) of a checkpoint, ours or the authors'. run: authors, modality, num_outputs (None: a
    pre-training checkpoint), sampling_rate, task, and the test views or, for ours, every saved argument."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        cfg, modality, num_outputs = authors_config(args, model_state(checkpoint), **overrides)
        # --loss exists only in their regression script; their pre-training saves no sampling rate (it is 4)
        return cfg, dict(authors=True, modality=modality, num_outputs=num_outputs,
                         task="regression" if hasattr(args, "loss") else "classification",
                         sampling_rate=getattr(args, "sampling_rate", None) or 4,
                         num_clips=getattr(args, "test_num_segment", 2),
                         num_crops=getattr(args, "test_num_crop", 2))
    if isinstance(args, dict) and "model_config" in checkpoint:
        run = dict(dict(modality="av", num_outputs=None, sampling_rate=4), **args, authors=False)
        return HiCMAEConfig(**checkpoint["model_config"]), run
    raise ValueError("neither a checkpoint of pretrain.py or finetune.py nor one of the authors'")


def not_built(model):
    """Prefixes of checkpoint weights a model has no place for, and leaves out: a classifier builds no decoders,
    and no encoder, fusion or layer weights its modality and configuration do without."""
    if not isinstance(model, HiCMAEClassifier):
        return ()
    parts = ("video_encoder", "audio_encoder", "fusion", "video_layer_weights", "audio_layer_weights")
    return ("video_decoder.", "audio_decoder.", *(name for name in parts if getattr(model, name, None) is None))


def weights_that_fit(model, state_dict, log):
    """The checkpoint's weights the model takes, by our names. A weight with no place in the model is an error
    (but not_built's), and so is one of another shape, but for a classifier's head: it stays fresh, with a note."""
    own, skip = model.state_dict(), not_built(model)
    fit = {}
    for key, value in state_dict.items():
        if key not in own and key.startswith(skip):
            continue
        if key not in own:
            raise KeyError(f"checkpoint weight '{key}' {tuple(value.shape)} has no place in {type(model).__name__}")
        if own[key].shape == value.shape:
            fit[key] = value
        elif isinstance(model, HiCMAEClassifier) and key.startswith("head."):
            log(f"note: '{key}' is {tuple(value.shape)} in the checkpoint and {tuple(own[key].shape)} here: "
                "keeping the new, freshly initialised head")
        else:
            raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)}, "
                             f"model {tuple(own[key].shape)}")
    return fit


KEPT_FRESH = ("head.", "fc_norm.", "video_layer_", "audio_layer_")  # what a classifier may lack in a checkpoint


def load_weights(model, state_dict, log=print):
    """Load our or the authors' weights into HiCMAE or HiCMAEClassifier, leaving out what a classifier does not
    build (not_built). A head of another size, and a head, fc_norm or layer weights the checkpoint lacks, stay
    fresh, with a note to log (None: no note); any other mismatch is an error naming the key."""
    if any(k.startswith(("encoder.", "encoder_audio.")) for k in state_dict):  # the authors' names
        state_dict = convert_official(state_dict)
    log = log or (lambda message: None)
    load = weights_that_fit(model, state_dict, log)
    fresh = [k for k in model.state_dict() if k not in load]
    unexpected = [k for k in fresh if not k.startswith(KEPT_FRESH)]
    if unexpected:
        raise KeyError(f"{len(unexpected)} weights of the model are not in the checkpoint, e.g. {unexpected[:5]}")
    model.load_state_dict(load, strict=False)
    if fresh:
        log(f"note: initialised fresh (not in the checkpoint): {', '.join(sorted({k.split('.')[0] for k in fresh}))}")
    return model


if __name__ == "__main__":
    print(size_table())
