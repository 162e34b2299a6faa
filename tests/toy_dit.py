"""A small DiT written out in plain torch, so tests control every op the backend must handle.

It has what real DiTs have: a patch embedding that creates the token axis (conv + flatten), timestep
conditioning broadcast over tokens (adaLN), joint attention over text and image tokens with rotary
embeddings built in-graph from `arange`, cross-attention to text, an MLP, and an unpatchify that splits
the token axis again.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotary(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    frequencies = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = torch.outer(positions.float(), frequencies)
    return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, width: int, heads: int, cross: bool):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Linear(width, 6 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.context_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.cross = nn.Linear(width, width) if cross else None
        self.cross_kv = nn.Linear(width, 2 * width) if cross else None
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))

    def split_heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, context, conditioning, cos, sin, mask=None):
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = self.modulation(conditioning)[:, None].chunk(6, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = [self.split_heads(t) for t in self.qkv(h).chunk(3, dim=-1)]
        cq, ck, cv = [self.split_heads(t) for t in self.context_qkv(context).chunk(3, dim=-1)]
        q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        text_length = context.shape[1]
        context = context + attended[:, :text_length]
        x = x + gate * self.out(attended[:, text_length:])
        if self.cross is not None:
            kv = self.cross_kv(context)
            ck, cv = [self.split_heads(t) for t in kv.chunk(2, dim=-1)]
            cq = self.split_heads(self.cross(self.norm(x)))
            x = x + F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).flatten(2)
        h = self.norm(x) * (1 + mlp_scale) + mlp_shift
        return x + mlp_gate * self.mlp(h), context


class ToyDiT(nn.Module):
    def __init__(self, channels=4, width=32, heads=4, depth=2, patch=2, text_width=24):
        super().__init__()
        self.patch = patch
        self.heads = heads
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.text = nn.Linear(text_width, width)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads, cross=(i % 2 == 1)) for i in range(depth))
        self.final = nn.Linear(width, patch * patch * channels)

    def forward(self, latents, text, timestep, text_mask=None):
        batch, channels, height, width = latents.shape
        x = self.embed(latents).flatten(2).transpose(1, 2)
        context = self.text(text)
        conditioning = self.time(timestep[:, None])
        positions = torch.arange(context.shape[1] + x.shape[1], device=x.device)
        cos, sin = rotary(positions, x.shape[-1] // self.heads)
        mask = None
        if text_mask is not None:
            keep = torch.cat([text_mask, text_mask.new_ones(batch, x.shape[1])], dim=1).bool()
            mask = keep[:, None, None, :]
        for block in self.blocks:
            x, context = block(x, context, conditioning, cos, sin, mask)
        x = self.final(x)
        rows, columns = height // self.patch, width // self.patch
        x = x.reshape(batch, rows, columns, self.patch, self.patch, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def toy_inputs(height=8, width=8, text_length=6, batch=1, channels=4, text_width=24, masked=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        latents=torch.randn(batch, channels, height, width, generator=generator),
        text=torch.randn(batch, text_length, text_width, generator=generator),
        timestep=torch.rand(batch, generator=generator),
    )
    if masked:
        text_mask = torch.ones(batch, text_length)
        text_mask[:, -2:] = 0
        inputs["text_mask"] = text_mask
    return inputs
