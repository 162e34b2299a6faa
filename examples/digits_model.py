"""The digits model: a tiny class-conditional FLUX transformer trained on scikit-learn's 8x8 digits.

Shared by `train_digits.py` (which trains it), `quickstart.py` and `benchmarks/fbcache_sweep.py`.

- Images: the 8x8 digits, one channel, scaled to [-1, 1], packed 2x2 into 16 image tokens of 4 channels,
  exactly like FluxPipeline packs its latents (the "latents" here are the pixels: there is no VAE).
- Conditioning: the class label (0-9) goes through a learned embedding that plays the text encoder: it
  gives `TEXT_TOKENS` "text" tokens (`encoder_hidden_states`) and a pooled vector (`pooled_projections`).
- Flow matching (rectified flow), as FLUX is trained: x_t = (1 - t) * image + t * noise, the model
  predicts the velocity noise - image, and sampling integrates from t = 1 (noise) to t = 0 with Euler steps.
  The timestep goes to the model in [0, 1], as FluxPipeline passes it (the model multiplies by 1000).

The model that gets compiled is the plain diffusers `FluxTransformer2DModel`; nothing here changes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "digits_dit"
IMAGE_SIZE = 8
TOKENS_PER_SIDE = IMAGE_SIZE // 2  # 2x2 packing: 4x4 = 16 image tokens
TEXT_TOKENS = 2
NUM_CLASSES = 10

# A FLUX transformer with FLUX.1-schnell's structure (no guidance embedding), shrunk: 4 heads of 12
# channels, 2 double-stream and 8 single-stream blocks (0.48M parameters).
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,  # 1 channel, packed 2x2
    num_layers=2,
    num_single_layers=8,
    attention_head_dim=12,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 4, 4),  # sums to attention_head_dim
)


class LabelEncoder(nn.Module):
    """Stands in for the text encoders: a class label -> (text tokens, pooled vector)."""

    def __init__(self, config: dict = TRANSFORMER_CONFIG, text_tokens: int = TEXT_TOKENS):
        super().__init__()
        self.text_tokens = text_tokens
        self.text = nn.Embedding(NUM_CLASSES, text_tokens * config["joint_attention_dim"])
        self.pooled = nn.Embedding(NUM_CLASSES, config["pooled_projection_dim"])
        nn.init.normal_(self.text.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text(labels).view(labels.shape[0], self.text_tokens, -1)
        return text, self.pooled(labels)


def build(config: dict = TRANSFORMER_CONFIG):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config), LabelEncoder(config)


def load(directory: Path = WEIGHTS_DIR, device="cpu"):
    """The trained transformer and label encoder, fp32, eval mode."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())["transformer"]
    transformer, labels = build(config)
    state = load_file(str(directory / "model.safetensors"))
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    labels.load_state_dict({k[len("labels."):]: v for k, v in state.items() if k.startswith("labels.")})
    return transformer.to(device).eval(), labels.to(device).eval()


def save(transformer, labels, directory: Path, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {f"transformer.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"labels.{k}": v.contiguous() for k, v in labels.state_dict().items()})
    save_file(state, str(directory / "model.safetensors"))
    config = {"transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in TRANSFORMER_CONFIG.items()},
              "text_tokens": TEXT_TOKENS, "image_size": IMAGE_SIZE, **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits (shipped with the package: no download) as [N, 1, 8, 8] in [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return images * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4], as FluxPipeline._pack_latents."""
    b, c, h, w = images.shape
    images = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return images.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """The inverse of `pack`."""
    b, n, _ = tokens.shape
    side = int(round(n ** 0.5))
    tokens = tokens.view(b, side, side, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels, side * 2, side * 2)


def position_ids(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids, txt_ids) as FluxPipeline makes them: (0, row, col) per image token, zeros for text."""
    img_ids = torch.zeros(TOKENS_PER_SIDE, TOKENS_PER_SIDE, 3, device=device)
    img_ids[..., 1] += torch.arange(TOKENS_PER_SIDE, device=device)[:, None]
    img_ids[..., 2] += torch.arange(TOKENS_PER_SIDE, device=device)[None, :]
    return img_ids.reshape(-1, 3), torch.zeros(TEXT_TOKENS, 3, device=device)


def model_inputs(labels_module: LabelEncoder, labels: torch.Tensor) -> dict:
    """The keyword arguments that do not change during sampling."""
    text, pooled = labels_module(labels)
    img_ids, txt_ids = position_ids(labels.device)
    return dict(encoder_hidden_states=text, pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids,
                return_dict=False)


@torch.no_grad()
def sample(transformer: Callable, labels_module: LabelEncoder, labels: torch.Tensor, noise: torch.Tensor,
           steps: int, on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Euler integration of the flow from t = 1 (noise, [B, 1, 8, 8]) to t = 0; images in [-1, 1].

    `transformer` is called exactly like FluxPipeline calls it, once per step, with the timestep falling
    from 1 towards 0 (one generation, for First Block Cache).
    """
    inputs = model_inputs(labels_module, labels)
    x = pack(noise)
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for i in range(steps):
        t = times[i].expand(x.shape[0])
        velocity = transformer(hidden_states=x, timestep=t, **inputs)[0]
        x = x + (times[i + 1] - times[i]) * velocity
        if on_step is not None:
            on_step(i)
    return unpack(x)


def to_grid(images: torch.Tensor, columns: int, scale: int = 6, pad: int = 4):
    """[B, 1, 8, 8] in [-1, 1] -> a PIL image, `columns` per row, each digit scaled up `scale` times (bicubic)."""
    from PIL import Image

    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    rows = (images.shape[0] + columns - 1) // columns
    cell = IMAGE_SIZE * scale + pad
    grid = Image.new("L", (columns * cell + pad, rows * cell + pad), 0)
    for index, image in enumerate(images):
        tile = Image.fromarray(image[0].numpy()).resize((IMAGE_SIZE * scale,) * 2, Image.BICUBIC)
        grid.paste(tile, (pad + (index % columns) * cell, pad + (index // columns) * cell))
    return grid
