"""Reference DiT (Peebles & Xie): patchify, adaLN-Zero transformer blocks, unpatchify.

The block interface is what tdiff.cache relies on: `modulation` (adaLN shift/scale/gate), the pre-gate branches
`attn_branch` / `mlp_branch` (cached by the "branch" formulation, gates recomputed each step) and the two residual
sub-blocks `attn_residual` / `mlp_residual` (whose outputs the "output" formulation caches, seed Eq. 3).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checks import NetworkConfig, check_image_and_labels, config_from
from .embeddings import TimestepEmbedder, batch_time, sincos_pos_embed_2d


@dataclass
class DiTConfig(NetworkConfig):
    input_size: int = 16
    patch_size: int = 2
    in_channels: int = 1
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False

    NETWORK = "DiT"
    PRESETS = {
        "DiT-S/2": dict(input_size=32, in_channels=4, hidden_size=384, depth=12, num_heads=6, patch_size=2,
                        num_classes=1000, learn_sigma=True),
        "DiT-XL/2": dict(input_size=32, in_channels=4, hidden_size=1152, depth=28, num_heads=16, patch_size=2,
                         num_classes=1000, learn_sigma=True),
        # small enough to train on two CPU cores in minutes. Patch 4 (16 tokens) rather than 2: the digits are
        # 8x8 upsampled, so a 4x4 patch holds 2x2 real pixels, and it makes the model 4x cheaper to train and sample
        "digits": dict(input_size=16, in_channels=1, hidden_size=128, depth=6, num_heads=4, patch_size=4,
                       num_classes=10),
    }

    def __post_init__(self):
        self.check_positive("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or \
                not 0 < self.mlp_ratio < float("inf"):
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine on the normalised tokens (B, N, C) with (B, C) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning. The gates start at zero, so every block is the
    identity at initialisation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor):
        """(B, C) conditioning -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attn_branch(self, x, shift, scale):
        return self.attn(modulate(self.norm1(x), shift, scale))

    def mlp_branch(self, x, shift, scale):
        return self.mlp(modulate(self.norm2(x), shift, scale))

    @staticmethod
    def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero residual update x + gate * branch, with the (B, C) gate broadcast over the tokens."""
        return x + gate.unsqueeze(1) * branch

    def attn_residual(self, x, shift, scale, gate):
        return self.gated_residual(x, gate, self.attn_branch(x, shift, scale))

    def mlp_residual(self, x, shift, scale, gate):
        return self.gated_residual(x, gate, self.mlp_branch(x, shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sm, cm, gm, sp, cp, gp = self.modulation(c)
        x = self.attn_residual(x, sm, cm, gm)
        return self.mlp_residual(x, sp, cp, gp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index num_classes, for the null (unconditional) label. During
    training a fraction class_dropout_prob of labels is replaced by the null label, which is what makes
    classifier-free guidance possible with a single network."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class DiT(nn.Module):
    def __init__(self, config: Optional[DiTConfig] = None, **kwargs):
        super().__init__()
        self.config = cfg = config_from(DiTConfig, config, kwargs)
        self.num_classes = cfg.num_classes
        self.null_label = cfg.num_classes
        self.out_channels = cfg.out_channels
        self.grid = cfg.input_size // cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        # fixed, not learned; a buffer so it follows .to() but is rebuilt rather than trained
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every gate and the output layer start at zero, so the untrained network outputs zero
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_input(self, x: torch.Tensor, y: Optional[torch.Tensor]):
        cfg = self.config
        check_image_and_labels(x, y, cfg.in_channels, cfg.input_size, self.null_label)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W) image."""
        p, c, g = self.config.patch_size, self.out_channels, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def condition(self, t, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """The adaLN conditioning c = t_emb + y_emb, (B, C)."""
        t = batch_time(t, batch, device)
        if y is None:
            y = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        return self.t_embedder(t) + self.y_embedder(y.long())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W), t network time (scalar or (B,)), y class labels (B,) long or None (null class)."""
        self.check_input(x, y)
        c = self.condition(t, y, x.shape[0], x.device)
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: torch.Tensor, t, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batched call: uncond + s (cond - uncond) on the whole output
        (learned-sigma channels included, unlike the original DiT which guides only 3 channels)."""
        b = x.shape[0]
        t = batch_time(t, b, x.device)
        null = torch.full_like(y, self.null_label)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


__all__ = ["DiT", "DiTConfig", "DiTBlock", "FinalLayer", "LabelEmbedder", "Attention", "Mlp", "modulate"]
