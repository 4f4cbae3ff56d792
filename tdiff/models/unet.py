"""Reference DDPM-style UNet (Ho et al.): ResBlocks with a timestep embedding, self-attention at chosen
resolutions, down/up sampling and skip connections.

For caching, every ResBlock and AttnBlock exposes its residual branch as `branch`, and the model keeps its blocks
in three ModuleLists, `down_blocks`, `mid_blocks` and `up_blocks`, which it runs in that order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import NetworkConfig, check_image_and_labels, config_from
from .embeddings import batch_time, timestep_features


@dataclass
class UNetConfig(NetworkConfig):
    input_size: int = 16
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: Tuple[int, ...] = (8,)
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional
    class_dropout_prob: float = 0.1
    num_groups: int = 8
    num_heads: int = 1

    NETWORK = "UNet"
    PRESETS = {
        "digits": dict(input_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(4,), num_classes=10, num_groups=8),
        "ddpm-cifar10": dict(input_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_groups=32),
    }

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.check_positive("input_size", "in_channels", "base_channels", "num_res_blocks", "num_groups", "num_heads")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.input_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(
                f"input_size ({self.input_size}) must be divisible by 2**{len(self.channel_mult) - 1} "
                f"for channel_mult {self.channel_mult}"
            )
        reached = [self.input_size // 2**i for i in range(len(self.channel_mult))]
        if any(r not in reached for r in self.attn_resolutions):
            # a resolution the network never reaches would silently get no attention
            raise ValueError(f"attn_resolutions must be resolutions the network reaches, {reached} for input_size "
                             f"{self.input_size} and channel_mult {self.channel_mult}, got {self.attn_resolutions}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(f"base_channels*{m} must be divisible by num_groups ({self.num_groups})")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"], d["attn_resolutions"] = list(self.channel_mult), list(self.attn_resolutions)
        return d


class ResBlock(nn.Module):
    """forward(x, emb) = skip(x) + branch(x, emb). The last conv of the branch starts at zero."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def branch(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        return self.conv2(self.dropout(F.silu(self.norm2(h))))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.branch(x, emb)


class AttnBlock(nn.Module):
    """Self-attention over the pixels. forward(x) = x + branch(x); the output projection starts at zero."""

    def __init__(self, ch: int, groups: int, num_heads: int = 1):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"channels ({ch}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class ResAttn(nn.Module):
    """One UNet step: a ResBlock, optionally followed by an AttnBlock."""

    def __init__(self, res: ResBlock, attn: Optional[AttnBlock]):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, config: Optional[UNetConfig] = None, **kwargs):
        super().__init__()
        self.config = cfg = config_from(UNetConfig, config, kwargs)
        self.num_classes = cfg.num_classes
        self.null_label = cfg.num_classes if cfg.num_classes else None
        ch0, g = cfg.base_channels, cfg.num_groups
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra row, index num_classes, is the null label used for classifier-free guidance
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def step(cin, cout, res):
            attn = AttnBlock(cout, g, cfg.num_heads) if res in cfg.attn_resolutions else None
            return ResAttn(ResBlock(cin, cout, emb_dim, cfg.dropout, g), attn)

        # down path: every module's output becomes a skip for the up path
        self.down_blocks = nn.ModuleList()
        skip_ch, ch, res = [ch0], ch0, cfg.input_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(step(ch, ch0 * mult, res))
                ch = ch0 * mult
                skip_ch.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down_blocks.append(Downsample(ch))
                res //= 2
                skip_ch.append(ch)

        self.mid_blocks = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, cfg.dropout, g), AttnBlock(ch, g, cfg.num_heads),
             ResBlock(ch, ch, emb_dim, cfg.dropout, g)]
        )

        # up path: ResAttn steps consume one skip each (concatenated on channels); Upsample consumes none
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up_blocks.append(step(ch + skip_ch.pop(), ch0 * mult, res))
                ch = ch0 * mult
            if level != 0:
                self.up_blocks.append(Upsample(ch))
                res *= 2

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def check_input(self, x: torch.Tensor, y: Optional[torch.Tensor]):
        cfg = self.config
        check_image_and_labels(x, y if self.num_classes else None, cfg.in_channels, cfg.input_size, self.num_classes)
        if y is not None and not self.num_classes:
            raise ValueError("this UNet is unconditional (num_classes=0); y must be None")

    def embedding(self, t, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        t = batch_time(t, batch, device)
        emb = self.time_mlp(timestep_features(t, self.config.base_channels).to(self.conv_in.weight.dtype))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            elif self.training and self.config.class_dropout_prob > 0:
                drop = torch.rand(batch, device=device) < self.config.class_dropout_prob
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            emb = emb + self.class_embed(y.long())
        return emb

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W), t network time (scalar or (B,)), y class labels (B,) long or None."""
        self.check_input(x, y)
        emb = self.embedding(t, y, x.shape[0], x.device)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down_blocks:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid_blocks:
            h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
        for blk in self.up_blocks:
            if isinstance(blk, ResAttn):
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_with_cfg(self, x: torch.Tensor, t, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        if not self.num_classes:
            raise ValueError("classifier-free guidance needs a class-conditional UNet (num_classes > 0)")
        b = x.shape[0]
        t = batch_time(t, b, x.device)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.num_classes)]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


__all__ = ["UNet", "UNetConfig", "ResBlock", "AttnBlock", "ResAttn", "Downsample", "Upsample"]
