"""Tiny, deterministic diffusers transformers, called the way their pipelines call them.

Each `TinyCase` builds a randomly initialised, few-block version of a diffusers (0.42.1) DiT and
makes the keyword arguments its pipeline passes to `transformer(...)` inside the denoising loop
(latent packing, position ids, rotary tables, masks, timestep scaling), so that a compiled model
sees the same graph structure, dtypes and argument kinds as in real inference.

    case = CASES["flux"]
    model = case.build()
    out = case.output(model(**case.make_inputs(seed=0, size="uneven")))

`make_inputs(seed=0, size="default", batch=1)`: `batch=2` gives what pipelines that batch
cond/uncond pass (prompts of different lengths, so per-row masks differ).

Sizes (token counts are after patchification):
    "default": 8x8 image tokens (video: 2 frames of 8x8), 8 text tokens.
    "other":   8x12 image tokens (video: 2 frames of 8x12): a different token count, to force
               recompilation.
    "uneven":  5x7 image tokens (video: 3 frames of 5x7), 6 text tokens: image tokens are odd, so
               not divisible by 2 or 4 ranks, and neither is image + text; non-square.

Text masks pad the last tokens of each prompt, so masks change the result. The pipelines
themselves are not imported: they need the `transformers` package. Their input preparation is
mirrored below, and each function names the pipeline code it follows.

Speed: one eager forward takes a few ms with `torch.set_num_threads(1)`. With several intra-op
threads on a busy 2-core machine, thread synchronisation makes each forward take ~300 ms, so
test processes (one per rank, especially) should use a single thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed


@dataclass
class TinyCase:
    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[..., dict]  # make_inputs(seed=0, size="default", batch=1) -> model kwargs
    output: Callable[[Any], torch.Tensor]
    heads: int


SIZES = ("default", "other", "uneven")

# Every tiny model uses 4 heads of 16 channels, so heads divide by 2 and 4 ranks.
HEADS = 4
HEAD_DIM = 16
INNER_DIM = HEADS * HEAD_DIM
TEXT_DIM = 32  # width of the (absent) text encoder's hidden states
POOLED_DIM = 16  # width of pooled text embeddings (CLIP pooled output in the real pipelines)
LATENT_CHANNELS = 4  # VAE latent channels (16 or 128 in the real models)


@dataclass(frozen=True)
class _Size:
    frames: int  # latent frames (video models only; patch_size_t is 1 for all of them)
    height: int  # tokens along height, after patching
    width: int  # tokens along width, after patching
    text: int  # text tokens, the last 2 of which are padding where the pipeline pads


_SIZES = {
    "default": _Size(frames=2, height=8, width=8, text=8),
    "other": _Size(frames=2, height=8, width=12, text=8),
    "uneven": _Size(frames=3, height=5, width=7, text=6),
}
_TEXT_PAD = 2


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _build(model_cls, **config) -> torch.nn.Module:
    """Instantiates `model_cls(**config)` with seeded random weights, fp32, eval mode."""
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(**config)
        # A few parameters are zero-initialised (e.g. Mochi's RoPE frequencies), which would make
        # the code reading them a no-op; give them small random values so they matter in tests.
        with torch.no_grad():
            for param in model.parameters():
                if param.numel() > 1 and not param.any():
                    param.normal_(std=0.1)
    # Built in the default dtype (fp32); a `.to(float32)` would only log a diffusers warning.
    return model.eval()


def _size(size: str) -> _Size:
    if size not in _SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return _SIZES[size]


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _timestep(generator: torch.Generator, batch: int, dtype=torch.float32) -> torch.Tensor:
    """A scheduler timestep in [0, 1000), broadcast like the pipelines do: `t.expand(batch)`."""
    t = torch.rand(1, generator=generator) * 1000
    return t.to(dtype).expand(batch)


def _text_mask(batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokenizer-style attention mask: 1 for prompt tokens, 0 for right padding.

    Row b has `_TEXT_PAD + b` padded tokens, so batched prompts have different lengths.
    """
    valid = torch.tensor([max(1, length - _TEXT_PAD - b) for b in range(batch)])
    return (torch.arange(length)[None, :] < valid[:, None]).to(dtype)


def _zero_padded_text(
    generator: torch.Generator, batch: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings whose padded positions are zero (Wan, QwenImage pad with `new_zeros`)."""
    mask = _text_mask(batch, length, torch.long)
    embeds = _randn(generator, batch, length, TEXT_DIM) * mask[..., None]
    return embeds, mask


def _pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4], as FluxPipeline/QwenImagePipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def _first(output) -> torch.Tensor:
    # Every case passes return_dict=False, so the model returns a tuple `(sample,)`.
    return output[0]


# ---------------------------------------------------------------------------------------------
# FLUX.1-dev: FluxPipeline.__call__
# ---------------------------------------------------------------------------------------------


def _flux_build():
    return _build(
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
    )


def _flux_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    # FluxPipeline._prepare_latent_image_ids: (0, row, col) per packed token.
    img_ids = torch.zeros(s.height, s.width, 3)
    img_ids[..., 1] += torch.arange(s.height)[:, None]
    img_ids[..., 2] += torch.arange(s.width)[None, :]
    return dict(
        hidden_states=_pack_2x2(latents),
        timestep=_timestep(g, batch) / 1000,  # the model multiplies by 1000 again
        guidance=torch.full([1], 3.5).expand(batch),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),  # T5 pads, but passes no mask
        txt_ids=torch.zeros(s.text, 3),
        img_ids=img_ids.reshape(-1, 3),
        joint_attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 3.5 medium: StableDiffusion3Pipeline.__call__
# ---------------------------------------------------------------------------------------------


def _sd3_build():
    return _build(
        SD3Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=INNER_DIM,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,  # >= the largest token grid side (12)
        # SD3.5-medium style: block 0 adds an image-only self-attention next to the joint one,
        # block 1 is a plain SD3 joint block, so both attention layouts are covered.
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _sd3_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),  # CLIP+T5 embeds, no mask
        pooled_projections=_randn(g, batch, POOLED_DIM),
        joint_attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Wan 2.1: WanPipeline.__call__ (t2v) and WanImageToVideoPipeline.__call__ (i2v)
# ---------------------------------------------------------------------------------------------

_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    out_channels=LATENT_CHANNELS,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=2 * INNER_DIM,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)
# WanAttnProcessor splits image from text tokens assuming exactly 512 text tokens (it hard-codes
# the T5 context length), so i2v must get full-length, zero-padded text like the pipeline gives.
_WAN_I2V_TEXT_LEN = 512
_WAN_IMAGE_DIM = 24  # CLIP ViT-H hidden size (1280 in the real model)
_WAN_IMAGE_TOKENS = 5  # CLIP image tokens (257 in the real model)
_WAN_VAE_TEMPORAL = 4  # vae_scale_factor_temporal: channels of the i2v frame mask


def _wan_t2v_build():
    return _build(WanTransformer3DModel, in_channels=LATENT_CHANNELS, **_WAN_CONFIG)


def _wan_i2v_build():
    return _build(
        WanTransformer3DModel,
        # noise latents + first-frame mask + encoded conditioning video, concatenated on channels
        in_channels=2 * LATENT_CHANNELS + _WAN_VAE_TEMPORAL,
        image_dim=_WAN_IMAGE_DIM,
        added_kv_proj_dim=INNER_DIM,  # the image embedder projects CLIP states to the model width
        **_WAN_CONFIG,
    )


def _wan_t2v_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width)
    # WanPipeline._get_t5_prompt_embeds zero-pads to max_sequence_length and passes no mask; the
    # tiny case uses a short max_sequence_length.
    prompt_embeds, _ = _zero_padded_text(g, batch, s.text)
    return dict(
        hidden_states=latents,
        timestep=_timestep(g, batch),
        encoder_hidden_states=prompt_embeds,
        attention_kwargs=None,
        return_dict=False,
    )


def _wan_i2v_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    shape = (batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width)
    latents = _randn(g, *shape)
    # WanImageToVideoPipeline.prepare_latents: condition = [frame mask, VAE(image, zeros...)],
    # the mask is 1 on the first latent frame (the given image) and 0 elsewhere.
    frame_mask = torch.zeros(batch, _WAN_VAE_TEMPORAL, *shape[2:])
    frame_mask[:, :, 0] = 1
    latent_condition = _randn(g, *shape)
    prompt_embeds, _ = _zero_padded_text(g, batch, _WAN_I2V_TEXT_LEN)
    return dict(
        hidden_states=torch.cat([latents, frame_mask, latent_condition], dim=1),
        timestep=_timestep(g, batch),
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_image=_randn(g, batch, _WAN_IMAGE_TOKENS, _WAN_IMAGE_DIM),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# HunyuanVideo: HunyuanVideoPipeline.__call__
# ---------------------------------------------------------------------------------------------


def _hunyuan_video_build():
    return _build(
        HunyuanVideoTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(4, 6, 6),  # sums to HEAD_DIM
    )


def _hunyuan_video_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),  # Llama hidden states
        # The pipeline casts the tokenizer mask to the transformer dtype.
        encoder_attention_mask=_text_mask(batch, s.text, torch.float32),
        pooled_projections=_randn(g, batch, POOLED_DIM),  # CLIP pooled output
        guidance=torch.tensor([6.0] * batch) * 1000.0,
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# CogVideoX-5b (v1.0, rotary embeddings): CogVideoXPipeline.__call__
# ---------------------------------------------------------------------------------------------

_COGVIDEOX_CONFIG = dict(
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    time_embed_dim=32,
    text_embed_dim=TEXT_DIM,
    num_layers=2,
    patch_size=2,
    # The 5b base grid; used only by the pipeline's RoPE crop region, since rotary embeddings
    # replace the sincos table that would depend on it.
    sample_width=90,
    sample_height=60,
    use_rotary_positional_embeddings=True,
)


def _cogvideox_build():
    return _build(CogVideoXTransformer3DModel, **_COGVIDEOX_CONFIG)


def _cogvideox_rotary_emb(frames: int, grid_h: int, grid_w: int, config=None):
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for v1.0 (patch_size_t=None); ConsisIDPipeline's
    is the same.

    The pipeline computes it once, from the transformer config, before the denoising loop.
    """
    config = config or _COGVIDEOX_CONFIG
    p = config["patch_size"]
    base_w, base_h = config["sample_width"] // p, config["sample_height"] // p
    # get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h), copied from the pipeline.
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_h, resize_w = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"],
        crops_coords=((top, left), (top + resize_h, left + resize_w)),
        grid_size=(grid_h, grid_w),
        temporal_size=frames,
    )


def _cogvideox_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        # CogVideoX latents are [B, F, C, H, W].
        hidden_states=_randn(g, batch, s.frames, LATENT_CHANNELS, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),  # T5 pads, but passes no mask
        timestep=_timestep(g, batch, dtype=torch.long),  # CogVideoXDDIMScheduler: int timesteps
        image_rotary_emb=_cogvideox_rotary_emb(s.frames, s.height, s.width),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Mochi 1: MochiPipeline.__call__
# ---------------------------------------------------------------------------------------------


def _mochi_build():
    return _build(
        MochiTransformer3DModel,
        patch_size=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=32,  # width of the text stream inside the blocks
        in_channels=LATENT_CHANNELS,
        text_embed_dim=TEXT_DIM,  # must divide by the 8 heads of the caption attention pool
        time_embed_dim=32,
    )


def _mochi_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch),
        encoder_attention_mask=_text_mask(batch, s.text, torch.bool),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# LTX-Video: LTXPipeline.__call__
# ---------------------------------------------------------------------------------------------


def _ltx_video_build():
    return _build(
        LTXVideoTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER_DIM,
        num_layers=2,
        caption_channels=TEXT_DIM,
    )


def _ltx_video_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, s.frames, s.height, s.width)
    # LTXPipeline._pack_latents with patch size 1: [B, C, F, H, W] -> [B, F*H*W, C].
    latents = latents.permute(0, 2, 3, 4, 1).flatten(1, 3)
    vae_temporal, vae_spatial, frame_rate = 8, 32, 25  # LTX VAE compression, default frame rate
    return dict(
        hidden_states=latents,
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch),
        encoder_attention_mask=_text_mask(batch, s.text, torch.bool),
        num_frames=s.frames,
        height=s.height,
        width=s.width,
        rope_interpolation_scale=(vae_temporal / frame_rate, vae_spatial, vae_spatial),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Qwen-Image: QwenImagePipeline.__call__
# ---------------------------------------------------------------------------------------------


def _qwen_image_build():
    return _build(
        QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
    )


def _qwen_image_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    # _get_qwen_prompt_embeds zero-pads every prompt to the longest one and returns a long mask.
    # encode_prompt drops the mask (passes None) when nothing is padded, i.e. for a lone prompt;
    # the padded mask here is what one row of a multi-prompt batch gets.
    prompt_embeds, prompt_mask = _zero_padded_text(g, batch, s.text)
    return dict(
        hidden_states=_pack_2x2(latents),
        timestep=_timestep(g, batch) / 1000,
        guidance=None,  # Qwen-Image is not guidance-distilled
        encoder_hidden_states_mask=prompt_mask,
        encoder_hidden_states=prompt_embeds,
        img_shapes=[[(1, s.height, s.width)]] * batch,
        attention_kwargs={},  # the pipeline replaces None with {}
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# PixArt-Sigma: PixArtSigmaPipeline.__call__
# ---------------------------------------------------------------------------------------------


def _pixart_build():
    return _build(
        PixArtTransformer2DModel,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma: noise and variance
        num_layers=2,
        cross_attention_dim=INNER_DIM,
        sample_size=16,
        patch_size=2,
        caption_channels=TEXT_DIM,
        use_additional_conditions=False,  # Sigma: no resolution / aspect-ratio embedding
    )


def _pixart_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),  # T5 tokenizer mask
        timestep=_timestep(g, batch, dtype=torch.long),  # DPM-Solver: int timesteps
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Sana: SanaPipeline.__call__ (Gemma hidden states with their mask; float timesteps scaled by the config's
# timestep_scale). Its self-attention is linear attention (matmuls that contract over the tokens), its
# feed-forward a depthwise convolution over the image (GLUMBConv); only its cross-attention is SDPA.
# ---------------------------------------------------------------------------------------------


def _sana_build():
    from diffusers import SanaTransformer2DModel

    return _build(
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER_DIM,
        caption_channels=TEXT_DIM,
        sample_size=16,
    )


def _sana_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.height, s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),  # Gemma tokenizer mask
        timestep=_timestep(g, batch),  # flow matching: float timesteps (timestep_scale 1.0)
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# HiDream-I1: HiDreamImagePipeline.__call__ (T5 and Llama 3 hidden states; its rotary table arrives as one
# input over image and text tokens, and its mixture-of-experts routing breaks Dynamo's graph)
# ---------------------------------------------------------------------------------------------


def _hidream_build():
    from diffusers import HiDreamImageTransformer2DModel

    return _build(
        HiDreamImageTransformer2DModel,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        caption_channels=[TEXT_DIM, TEXT_DIM // 2],  # T5, Llama 3
        text_emb_dim=POOLED_DIM,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),  # sums to HEAD_DIM
        max_resolution=(32, 32),
        llama_layers=(0, 1),
        force_inference_output=True,
    )


def _hidream_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),  # patchified inside
        timesteps=_timestep(g, batch, dtype=torch.long),
        encoder_hidden_states_t5=_randn(g, batch, s.text, TEXT_DIM),
        encoder_hidden_states_llama3=_randn(g, 2, batch, s.text, TEXT_DIM // 2),  # one per llama_layers entry
        pooled_embeds=_randn(g, batch, POOLED_DIM),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Lumina-Image 2.0: Lumina2Pipeline.__call__ (Gemma hidden states with their attention mask; caption and
# image tokens are packed per sample into one pre-allocated sequence)
# ---------------------------------------------------------------------------------------------


def _lumina2_build():
    from diffusers import Lumina2Transformer2DModel

    return _build(
        Lumina2Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        hidden_size=HEADS * HEAD_DIM,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=HEADS,
        num_kv_heads=2,  # grouped-query attention, as in the real model
        multiple_of=2,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(8, 4, 4),  # sums to HEAD_DIM
        axes_lens=(128, 128, 128),
        cap_feat_dim=TEXT_DIM,
    )


def _lumina2_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),  # patchified inside
        timestep=_timestep(g, batch) / 1000,  # the pipeline passes 1 - t / 1000
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.bool),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Sana-Video: SanaVideoPipeline.__call__ (Gemma hidden states with their mask, flow-matching float timesteps).
# Linear self-attention as Sana's, with a Wan-style 3D rotary table; its feed-forward convolves each frame
# (depthwise 3x3) and then each token over time (3x1).
# ---------------------------------------------------------------------------------------------


def _sana_video_build():
    from diffusers import SanaVideoTransformer3DModel

    return _build(
        SanaVideoTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER_DIM,
        caption_channels=TEXT_DIM,
        sample_size=16,
        patch_size=(1, 2, 2),
        rope_max_seq_len=64,
    )


def _sana_video_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),  # Gemma tokenizer mask
        timestep=_timestep(g, batch),
        return_dict=False,
        attention_kwargs=None,
    )


# ---------------------------------------------------------------------------------------------
# FLUX.2 [dev]: Flux2Pipeline.__call__ (Mistral hidden states, no mask; 4-axis integer position ids per sample,
# (t, h, w, l); latents patchified to 2x2 in the channels, then packed one token per latent pixel)
# ---------------------------------------------------------------------------------------------


def _flux2_build():
    from diffusers import Flux2Transformer2DModel

    return _build(
        Flux2Transformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2-patchified latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to HEAD_DIM
        guidance_embeds=True,
    )


def _flux2_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS * 4, s.height, s.width)  # Flux2Pipeline.prepare_latents
    # _prepare_latent_ids: (0, row, col, 0) per token, expanded over the batch; _prepare_text_ids: (0, 0, 0, i).
    one = torch.arange(1)
    img_ids = torch.cartesian_prod(one, torch.arange(s.height), torch.arange(s.width), one)
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(s.text))
    return dict(
        hidden_states=latents.reshape(batch, LATENT_CHANNELS * 4, -1).permute(0, 2, 1),  # _pack_latents
        timestep=_timestep(g, batch) / 1000,
        guidance=torch.full([1], 4.0).expand(batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        txt_ids=torch.stack([txt_ids] * batch),
        img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1),
        joint_attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# ConsisID: ConsisIDPipeline.__call__ (CogVideoX-style joint attention with rotary embeddings, plus the identity
# branch: a local facial extractor over face embeddings and a perceiver cross-attention from the video tokens to
# the face tokens after every other block, written as matmul + softmax rather than SDPA)
# ---------------------------------------------------------------------------------------------

# The face branch's key/value width is 2/3 of the model width, so the width must divide by 3: 4 heads of 48.
_CONSISID_HEAD_DIM = 48
_CONSISID_CONFIG = dict(
    num_attention_heads=HEADS,
    attention_head_dim=_CONSISID_HEAD_DIM,
    in_channels=2 * LATENT_CHANNELS,  # noise latents + image latents, concatenated on channels
    out_channels=LATENT_CHANNELS,
    time_embed_dim=32,
    text_embed_dim=TEXT_DIM,
    num_layers=1,
    patch_size=2,
    sample_width=90,
    sample_height=60,
    use_rotary_positional_embeddings=True,
    is_train_face=True,
    cross_attn_interval=1,  # the face cross-attention after the block (every other block in the real model)
    cross_attn_dim_head=HEAD_DIM,
    cross_attn_num_heads=HEADS,
    LFE_id_dim=24,
    LFE_vit_dim=16,
    LFE_depth=2,
    LFE_dim_head=8,
    LFE_num_heads=2,
    LFE_num_id_token=2,
    LFE_num_querie=4,
    LFE_output_dim=HEADS * _CONSISID_HEAD_DIM * 2 // 3,
    LFE_ff_mult=2,
    LFE_num_scale=2,
)
_CONSISID_VIT_TOKENS = 5  # CLIP ViT tokens per face feature (577 in the real model)


def _consisid_build():
    from diffusers import ConsisIDTransformer3DModel

    return _build(ConsisIDTransformer3DModel, **_CONSISID_CONFIG)


def _consisid_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    shape = (batch, s.frames, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    latents = _randn(g, *shape)
    # ConsisIDPipeline.prepare_latents: the encoded face image as the first frame, zero frames after it.
    image_latents = torch.cat([_randn(g, batch, 1, *shape[2:]), torch.zeros(batch, s.frames - 1, *shape[2:])], dim=1)
    config = _CONSISID_CONFIG
    return dict(
        hidden_states=torch.cat([latents, image_latents], dim=2),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch, dtype=torch.long),  # CogVideoXDPMScheduler: int timesteps
        image_rotary_emb=_cogvideox_rotary_emb(s.frames, s.height, s.width, config),
        attention_kwargs=None,
        return_dict=False,
        id_vit_hidden=[_randn(g, batch, _CONSISID_VIT_TOKENS, config["LFE_vit_dim"])
                       for _ in range(config["LFE_num_scale"])],
        id_cond=_randn(g, batch, config["LFE_id_dim"]),
    )


# ---------------------------------------------------------------------------------------------
# Latte: LattePipeline.__call__ (T5 hidden states with the padding cut off, no mask; int timesteps). Spatial
# blocks attend within each frame ([batch * frames, patches, width]), temporal blocks within each patch
# position across frames ([batch * patches, frames, width]).
# ---------------------------------------------------------------------------------------------

# The temporal position table has exactly `video_length` rows and is added to every patch's frames, so the
# model runs only at that frame count (16 in the real model); every size uses it.
_LATTE_FRAMES = 3


def _latte_build():
    from diffusers import LatteTransformer3DModel

    return _build(
        LatteTransformer3DModel,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma
        num_layers=1,  # one spatial and one temporal block
        cross_attention_dim=INNER_DIM,
        attention_bias=True,
        sample_size=16,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=_LATTE_FRAMES,
    )


def _latte_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    # LattePipeline.encode_prompt(mask_feature=True) cuts the prompt to its unpadded length.
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, _LATTE_FRAMES, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text - _TEXT_PAD, TEXT_DIM),
        timestep=_timestep(g, batch, dtype=torch.long),
        enable_temporal_attentions=True,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# HunyuanImage 2.1: HunyuanImagePipeline.__call__ (Qwen2.5-VL hidden states and byT5 glyph embeddings, each
# with its tokenizer mask; float timesteps). Per sample, the model moves the valid tokens of both texts before
# the padded ones with boolean-mask indexing, which breaks Dynamo's graph.
# ---------------------------------------------------------------------------------------------

_BYT5_DIM = 24  # byT5 hidden size (1472 in the real model)


def _hunyuan_image_build():
    from diffusers import HunyuanImageTransformer2DModel

    return _build(
        HunyuanImageTransformer2DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=TEXT_DIM,
        text_embed_2_dim=_BYT5_DIM,
        rope_axes_dim=(8, 8),  # sums to HEAD_DIM
    )


def _hunyuan_image_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    glyph_tokens = s.text // 2
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.height, s.width),
        timestep=_timestep(g, batch),
        timestep_r=None,  # no meanflow
        guidance=None,  # not guidance-distilled
        attention_kwargs={},  # the pipeline replaces None with {}
        return_dict=False,
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        encoder_hidden_states_2=_randn(g, batch, glyph_tokens, _BYT5_DIM),
        encoder_attention_mask_2=_text_mask(batch, glyph_tokens, torch.long),
    )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _case(name, build, make_inputs) -> TinyCase:
    return TinyCase(name=name, build=build, make_inputs=make_inputs, output=_first, heads=HEADS)


CASES: dict[str, TinyCase] = {
    case.name: case
    for case in [
        _case("flux", _flux_build, _flux_inputs),
        _case("sd3", _sd3_build, _sd3_inputs),
        _case("wan_t2v", _wan_t2v_build, _wan_t2v_inputs),
        _case("wan_i2v", _wan_i2v_build, _wan_i2v_inputs),
        _case("hunyuan_video", _hunyuan_video_build, _hunyuan_video_inputs),
        _case("cogvideox", _cogvideox_build, _cogvideox_inputs),
        _case("mochi", _mochi_build, _mochi_inputs),
        _case("ltx_video", _ltx_video_build, _ltx_video_inputs),
        _case("qwen_image", _qwen_image_build, _qwen_image_inputs),
        _case("pixart", _pixart_build, _pixart_inputs),
        _case("hidream", _hidream_build, _hidream_inputs),
        _case("lumina2", _lumina2_build, _lumina2_inputs),
        _case("sana", _sana_build, _sana_inputs),
        _case("sana_video", _sana_video_build, _sana_video_inputs),
        _case("flux2", _flux2_build, _flux2_inputs),
        _case("consisid", _consisid_build, _consisid_inputs),
        _case("latte", _latte_build, _latte_inputs),
        _case("hunyuan_image", _hunyuan_image_build, _hunyuan_image_inputs),
    ]
}
