"""Tiny, deterministic diffusers transformers, called the way their pipelines call them.

Each `TinyCase` builds a randomly initialised, few-block version of a diffusers (0.42.1) DiT and
makes the keyword arguments its pipeline passes to `transformer(...)` inside the denoising loop
(latent packing, position ids, rotary tables, masks, timestep scaling), so that a compiled model
sees the same graph structure, dtypes and argument kinds as in real inference.

    case = CASES["flux"]
    model = case.build()
    out = case.output(model(**case.make_inputs(seed=0, size="uneven")))

`make_inputs(seed=0, size="default", batch=1)`: `batch=2` gives what pipelines that batch
cond/uncond pass (prompts of different lengths, so per-row masks differ). Pipelines that always put
the negative and the positive prompt in one batch (DiT, OmniGen, ERNIE-Image, PRX, Bria FIBO) get
2 * batch rows. FLUX.3 has no pipeline in diffusers 0.42.1: it is called as its forward documents.

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
# Chroma: ChromaPipeline.__call__ (FLUX.1-schnell's layout without the guidance and pooled text embedders: a
# distilled modulation approximator; T5 hidden states with a mask that keeps the first padding token, extended
# with ones over the image tokens, which the model turns into an outer-product [S, S] attention mask)
# ---------------------------------------------------------------------------------------------


def _chroma_build():
    from diffusers import ChromaTransformer2DModel

    return _build(
        ChromaTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


def _chroma_inputs(seed=0, size="default", batch=1):
    s = _size(size)
    inputs = _flux_inputs(seed, size, batch)
    # ChromaPipeline._get_t5_prompt_embeds: the mask keeps the first padding token; _prepare_attention_mask
    # appends ones for the image tokens (text first, as the joint sequence).
    prompt_tokens = _text_mask(batch, s.text, torch.long).sum(dim=1, keepdim=True)
    text_mask = torch.arange(s.text)[None, :] <= prompt_tokens
    del inputs["guidance"], inputs["pooled_projections"]
    # The pipeline casts the mask to the latents' dtype, then concatenates boolean ones.
    image_mask = torch.ones(batch, s.height * s.width, dtype=torch.bool)
    inputs["attention_mask"] = torch.cat([text_mask.float(), image_mask], dim=1)
    return inputs


# ---------------------------------------------------------------------------------------------
# CogView4: CogView4Pipeline.__call__ (GLM hidden states, no mask; SDXL-style size conditions; rotary embeddings
# on the image tokens only, written in place into q and k)
# ---------------------------------------------------------------------------------------------


def _cogview_conditions(batch: int, s: _Size) -> dict:
    """CogView3PlusPipeline/CogView4Pipeline: original and target size (pixels), crop corner, one row per sample."""
    size = torch.tensor([[16.0 * s.height, 16.0 * s.width]]).repeat(batch, 1)
    return dict(original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2))


def _cogview4_build():
    from diffusers import CogView4Transformer2DModel

    return _build(
        CogView4Transformer2DModel,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=32,
        condition_dim=16,
        pos_embed_max_size=16,
        sample_size=16,
        rope_axes_dim=(32, 32),
    )


def _cogview4_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch),
        **_cogview_conditions(batch, s),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# CogView3-Plus: CogView3PlusPipeline.__call__ (T5 hidden states, no mask; SDXL-style size conditions; text and
# image tokens joined in the patch embedding, a sincos table on the image part)
# ---------------------------------------------------------------------------------------------


def _cogview3plus_build():
    from diffusers import CogView3PlusTransformer2DModel

    return _build(
        CogView3PlusTransformer2DModel,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        out_channels=LATENT_CHANNELS,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=32,
        condition_dim=16,
        pos_embed_max_size=16,
        sample_size=16,
    )


def _cogview3plus_inputs(seed=0, size="default", batch=1):
    inputs = _cogview4_inputs(seed, size, batch)
    del inputs["attention_kwargs"]
    inputs["timestep"] = inputs["timestep"].long()  # CogVideoXDDIMScheduler: int timesteps
    return inputs


# ---------------------------------------------------------------------------------------------
# AuraFlow: AuraFlowPipeline.__call__ (UMT5 hidden states, no mask; timestep t / 1000; register tokens joined to
# the text; MMDiT blocks then single-stream blocks)
# ---------------------------------------------------------------------------------------------


def _auraflow_build():
    from diffusers import AuraFlowTransformer2DModel

    return _build(
        AuraFlowTransformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=INNER_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=256,  # a 16x16 grid, >= every token grid
    )


def _auraflow_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch) / 1000,
        return_dict=False,
        attention_kwargs=None,
    )


# ---------------------------------------------------------------------------------------------
# Allegro: AllegroPipeline.__call__ (T5 hidden states with their mask; 3D rotary tables as per-axis frequencies
# and per-token grid positions; self-attention over all video tokens, cross-attention to the text)
# ---------------------------------------------------------------------------------------------

# The 3D rotary table gives each axis a third of the head's channels, an even count each: 4 heads of 24.
_ALLEGRO_HEAD_DIM = 24
_ALLEGRO_CONFIG = dict(
    patch_size=2,
    patch_size_t=1,
    num_attention_heads=HEADS,
    attention_head_dim=_ALLEGRO_HEAD_DIM,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=1,
    cross_attention_dim=HEADS * _ALLEGRO_HEAD_DIM,
    sample_height=16,
    sample_width=16,
    sample_frames=4,
    caption_channels=TEXT_DIM,
)


def _allegro_build():
    from diffusers import AllegroTransformer3DModel

    return _build(AllegroTransformer3DModel, **_ALLEGRO_CONFIG)


def _allegro_inputs(seed=0, size="default", batch=1):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    g, s = torch.Generator().manual_seed(seed), _size(size)
    # AllegroPipeline._prepare_rotary_positional_embeddings
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=_ALLEGRO_HEAD_DIM, crops_coords=((0, 0), (s.height, s.width)), grid_size=(s.height, s.width),
        temporal_size=s.frames, interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        timestep=_timestep(g, batch, dtype=torch.long),
        image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(pos)),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Cosmos 1.0 text-to-world: CosmosTextToWorldPipeline.__call__ (T5 hidden states, no mask; 3D rotary table and a
# learnable position embedding computed inside the model; AdaLN-LoRA modulation). The pipeline also passes a zero
# padding mask at pixel resolution, which the model resizes to the latent grid with torchvision and concatenates as
# an input channel (concat_padding_mask); torchvision is not a test dependency, so the tiny config turns that off
# (a zero channel before the patch embedding: nothing the token axis sees).
# ---------------------------------------------------------------------------------------------


def _cosmos_build():
    from diffusers import CosmosTransformer3DModel

    return _build(
        CosmosTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=TEXT_DIM,
        adaln_lora_dim=16,
        max_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )


def _cosmos_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        fps=30,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# SkyReels-V2 (text to video): SkyReelsV2Pipeline.__call__ (Wan 2.1's architecture and call: zero-padded T5 text,
# no mask)
# ---------------------------------------------------------------------------------------------


def _skyreels_v2_build():
    from diffusers import SkyReelsV2Transformer3DModel

    return _build(SkyReelsV2Transformer3DModel, in_channels=LATENT_CHANNELS, **{**_WAN_CONFIG, "num_layers": 1})


# ---------------------------------------------------------------------------------------------
# Wan VACE: WanVACEPipeline.__call__ (Wan 2.1 t2v plus control hidden states: the VAE-encoded inactive and
# reactive video and the 8x8-folded mask, concatenated on channels, run through VACE blocks whose outputs are
# added, scaled, after the matching Wan blocks)
# ---------------------------------------------------------------------------------------------

_VACE_MASK_CHANNELS = 8  # the mask folded over the VAE's spatial factor (8 x 8 = 64 in the real model)


def _wan_vace_build():
    from diffusers import WanVACETransformer3DModel

    return _build(
        WanVACETransformer3DModel,
        in_channels=LATENT_CHANNELS,
        vace_layers=[0],
        vace_in_channels=2 * LATENT_CHANNELS + _VACE_MASK_CHANNELS,
        **{**_WAN_CONFIG, "num_layers": 1},
    )


def _wan_vace_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    inputs = _wan_t2v_inputs(seed, size, batch)
    shape = (batch, 2 * LATENT_CHANNELS + _VACE_MASK_CHANNELS, s.frames, 2 * s.height, 2 * s.width)
    inputs.update(
        control_hidden_states=_randn(g, *shape),
        control_hidden_states_scale=torch.tensor([0.5]),  # one per VACE layer
    )
    return inputs


# ---------------------------------------------------------------------------------------------
# HunyuanVideo 1.5 (text to video): HunyuanVideo15Pipeline.__call__ (Qwen2.5-VL hidden states and byT5 glyph
# embeddings, each with its mask; the latents concatenated with zero condition latents and a zero mask channel;
# zero SigLIP image embeddings for text to video)
# ---------------------------------------------------------------------------------------------

_SIGLIP_DIM = 24  # SigLIP hidden size (1152 in the real model)
_SIGLIP_TOKENS = 5  # SigLIP semantic tokens (729 in the real model)


def _hunyuan_video15_build():
    from diffusers import HunyuanVideo15Transformer3DModel

    return _build(
        HunyuanVideo15Transformer3DModel,
        in_channels=2 * LATENT_CHANNELS + 1,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=TEXT_DIM,
        text_embed_2_dim=_BYT5_DIM,
        image_embed_dim=_SIGLIP_DIM,
        rope_axes_dim=(4, 6, 6),  # sums to HEAD_DIM
        task_type="t2v",
    )


def _hunyuan_video15_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    shape = (batch, LATENT_CHANNELS, s.frames, s.height, s.width)  # patch size 1
    glyph_tokens = s.text // 2
    # prepare_cond_latents_and_mask for text to video: zero condition latents, a zero mask channel.
    condition = torch.zeros(shape)
    mask = torch.zeros(batch, 1, *shape[2:])
    return dict(
        hidden_states=torch.cat([_randn(g, *shape), condition, mask], dim=1),
        image_embeds=torch.zeros(batch, _SIGLIP_TOKENS, _SIGLIP_DIM),
        timestep=_timestep(g, batch),
        attention_kwargs=None,
        return_dict=False,
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        encoder_hidden_states_2=_randn(g, batch, glyph_tokens, _BYT5_DIM),
        encoder_attention_mask_2=_text_mask(batch, glyph_tokens, torch.long),
    )


# ---------------------------------------------------------------------------------------------
# Z-Image: ZImagePipeline.__call__ (per-sample lists: each latent as [C, 1, H, W] and each prompt's valid Qwen3
# hidden states, unpadded; timestep (1000 - t) / 1000). The model pads each sample's caption and image tokens
# to a multiple of 32 itself, refines them apart, then attends over both; it returns a list of per-sample latents.
# ---------------------------------------------------------------------------------------------


def _z_image_build():
    from diffusers import ZImageTransformer2DModel

    model = _build(
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=INNER_DIM,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=HEADS,
        n_kv_heads=HEADS,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[4, 6, 6],  # sums to HEAD_DIM
        axes_lens=[64, 32, 32],
    )
    # The rotary tables are computed on the first call, under a `torch.device` context Dynamo cannot enter (a graph
    # break); every later denoising step finds them cached and compiles one graph. One eager call gives the tiny
    # model that steady state.
    with torch.no_grad():
        model(**_z_image_inputs())
    return model


def _z_image_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    prompt_tokens = _text_mask(batch, s.text, torch.long).sum(dim=1).tolist()
    return dict(
        x=list(latents.unsqueeze(2).unbind(dim=0)),
        t=(1000 - _timestep(g, batch)) / 1000,
        cap_feats=[_randn(g, tokens, TEXT_DIM) for tokens in prompt_tokens],  # prompt_embeds[i][prompt_masks[i]]
        joint_attention_kwargs=None,
        return_dict=False,
    )


def _stacked_first(output) -> torch.Tensor:
    """Models that return a list of per-sample outputs (Z-Image): the samples stacked."""
    return torch.stack(list(output[0]))


# ---------------------------------------------------------------------------------------------
# DiT: DiTPipeline.__call__ (class-conditional: latents doubled for classifier-free guidance, the null class 1000 as
# the second half; int timesteps; learned sigma)
# ---------------------------------------------------------------------------------------------


def _dit_build():
    from diffusers import DiTTransformer2DModel

    return _build(
        DiTTransformer2DModel,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma
        num_layers=1,
        norm_num_groups=4,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def _dit_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    # DiT unpatchifies a square grid only: the grid side is the size's width (uneven: 7x7, 49 tokens).
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.width, 2 * s.width)
    class_labels = torch.randint(0, 1000, (batch,), generator=g)
    return dict(
        hidden_states=torch.cat([latents] * 2),  # guidance_scale > 1
        timestep=_timestep(g, 2 * batch, dtype=torch.long),
        class_labels=torch.cat([class_labels, torch.full((batch,), 1000)]),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# EasyAnimate V5.1: EasyAnimatePipeline.__call__ (Qwen2-VL hidden states, no mask passed to the model; float
# timesteps; MMDiT-style joint text + video attention with a 3D rotary table)
# ---------------------------------------------------------------------------------------------


def _easyanimate_build():
    from diffusers import EasyAnimateTransformer3DModel

    return _build(
        EasyAnimateTransformer3DModel,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=2,
        sample_width=16,
        sample_height=16,
        num_layers=1,
        mmdit_layers=1,
        time_embed_dim=32,
        text_embed_dim=TEXT_DIM,
        time_position_encoding_type="3d_rope",
        after_norm=False,
        resize_inpaint_mask_directly=True,
        enable_text_attention_mask=True,
        add_noise_in_inpaint_model=True,
    )


def _easyanimate_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Bria 3.2: BriaPipeline.__call__ (FLUX's layout without pooled text or guidance embeddings; T5 hidden states, no
# mask; integer-step timesteps; zero text ids and (0, row, col) image ids, without the batch dim)
# ---------------------------------------------------------------------------------------------


def _bria_build():
    from diffusers import BriaTransformer2DModel

    return _build(
        BriaTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=[4, 6, 6],  # sums to HEAD_DIM
    )


def _bria_inputs(seed=0, size="default", batch=1):
    inputs = _flux_inputs(seed, size, batch)
    del inputs["guidance"], inputs["pooled_projections"], inputs["joint_attention_kwargs"]
    inputs["timestep"] = inputs["timestep"] * 1000  # t.expand(batch): the scheduler's timestep
    inputs["attention_kwargs"] = None
    return inputs


# ---------------------------------------------------------------------------------------------
# LongCat-Image: LongCatImagePipeline.__call__ (Qwen2.5-VL hidden states, no mask; FLUX-style double and single
# blocks; text position ids (0, i, i), image ids (1, row, col) offset by the tokenizer's maximum length)
# ---------------------------------------------------------------------------------------------


def _longcat_image_build():
    from diffusers import LongCatImageTransformer2DModel

    return _build(
        LongCatImageTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[4, 6, 6],  # sums to HEAD_DIM
    )


def _longcat_image_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    # prepare_pos_ids: text (0, i, i); image (1, row + L, col + L), L the tokenizer's max length (here the text's).
    text_ids = torch.zeros(s.text, 3)
    text_ids[:, 1] = text_ids[:, 2] = torch.arange(s.text).float()
    img_ids = torch.ones(s.height, s.width, 3)
    img_ids[..., 1] = torch.arange(s.height)[:, None] + s.text
    img_ids[..., 2] = torch.arange(s.width)[None, :] + s.text
    return dict(
        hidden_states=_pack_2x2(latents),
        timestep=_timestep(g, batch) / 1000,
        guidance=None,
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        txt_ids=text_ids,
        img_ids=img_ids.reshape(-1, 3),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Ovis-Image: OvisImagePipeline.__call__ (Ovis hidden states, no mask; FLUX-style double and single blocks without
# pooled text or guidance embeddings)
# ---------------------------------------------------------------------------------------------


def _ovis_image_build():
    from diffusers import OvisImageTransformer2DModel

    return _build(
        OvisImageTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        out_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
    )


def _ovis_image_inputs(seed=0, size="default", batch=1):
    inputs = _flux_inputs(seed, size, batch)
    del inputs["guidance"], inputs["pooled_projections"]
    return inputs


# ---------------------------------------------------------------------------------------------
# ChronoEdit: ChronoEditPipeline.__call__ (Wan 2.1 i2v's architecture and call; two latent frames, the input image
# and the edit, take the rotary table's first and last temporal positions; more frames with temporal reasoning)
# ---------------------------------------------------------------------------------------------


def _chronoedit_build():
    from diffusers import ChronoEditTransformer3DModel

    return _build(
        ChronoEditTransformer3DModel,
        in_channels=2 * LATENT_CHANNELS + _WAN_VAE_TEMPORAL,
        image_dim=_WAN_IMAGE_DIM,
        added_kv_proj_dim=INNER_DIM,
        rope_temporal_skip_len=8,
        **{**_WAN_CONFIG, "num_layers": 1},
    )


# ---------------------------------------------------------------------------------------------
# Kandinsky 5.0 Lite (text to video): Kandinsky5T2VPipeline.__call__ (channels-last latents [B, T, H, W, C] with
# zero visual-condition channels and mask; Qwen2.5-VL hidden states of the prompt's own tokens and a pooled CLIP
# embedding; rotary positions as aranges per axis; regular, not sparse, attention)
# ---------------------------------------------------------------------------------------------


def _kandinsky5_build():
    from diffusers import Kandinsky5Transformer3DModel

    return _build(
        Kandinsky5Transformer3DModel,
        in_visual_dim=LATENT_CHANNELS,  # the model adds the visual condition and its mask (2 C + 1 channels in)
        in_text_dim=TEXT_DIM,
        in_text_dim2=POOLED_DIM,
        time_dim=32,
        out_visual_dim=LATENT_CHANNELS,
        patch_size=(1, 2, 2),
        model_dim=INNER_DIM,
        ff_dim=2 * INNER_DIM,
        num_text_blocks=1,
        num_visual_blocks=1,
        axes_dims=(4, 6, 6),  # sums to HEAD_DIM: INNER_DIM / HEAD_DIM heads
        visual_cond=True,
    )


def _kandinsky5_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    shape = (batch, s.frames, 2 * s.height, 2 * s.width, LATENT_CHANNELS)
    # prepare_latents with visual_cond: zero condition latents and a zero mask channel, concatenated on channels.
    latents = torch.cat([_randn(g, *shape), torch.zeros(shape), torch.zeros(*shape[:-1], 1)], dim=-1)
    return dict(
        hidden_states=latents,
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        timestep=_timestep(g, batch),
        visual_rope_pos=[torch.arange(s.frames), torch.arange(s.height), torch.arange(s.width)],
        text_rope_pos=torch.arange(s.text),
        scale_factor=(1, 3.16, 3.16),  # _get_scale_factor outside 480p
        sparse_params=None,  # attention_type "regular"
        return_dict=True,
    )


# ---------------------------------------------------------------------------------------------
# OmniGen: OmniGenPipeline.__call__ (text to image: the conditional and the unconditional prompt in one batch of 2,
# their token ids left-padded to one length; the model embeds them itself, appends a time token and the image
# tokens, and runs a Phi-3 stack under OmniGenMultiModalProcessor's [S, S] mask: causal over the text and the time
# token, bidirectional over the image, padding masked out)
# ---------------------------------------------------------------------------------------------

_OMNIGEN_VOCAB = 64


def _omnigen_build():
    from diffusers import OmniGenTransformer2DModel

    return _build(
        OmniGenTransformer2DModel,
        in_channels=LATENT_CHANNELS,
        patch_size=2,
        hidden_size=INNER_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=2 * INNER_DIM,
        num_layers=1,
        pad_token_id=_OMNIGEN_VOCAB - 1,
        vocab_size=_OMNIGEN_VOCAB,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        rope_scaling={"short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [2.0] * (HEAD_DIM // 2)},  # Phi-3's "su"
        pos_embed_max_size=16,
        time_step_dim=32,
    )


def _omnigen_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    rows = 2 * batch  # conditional and unconditional prompts (num_cfg + 1)
    image_tokens = s.height * s.width
    valid = _text_mask(rows, s.text, torch.long)  # left-padded below, as pad_input_ids does
    valid = valid.flip(-1)
    ids = torch.randint(0, _OMNIGEN_VOCAB - 1, (rows, s.text), generator=g).masked_fill(valid == 0, _OMNIGEN_VOCAB - 1)
    positions, masks = [], []
    for row in valid:  # OmniGenMultiModalProcessor.create_position and create_mask
        tokens, pad = int(row.sum()), s.text - int(row.sum())
        positions.append([0] * pad + list(range(tokens + image_tokens + 1)))
        mask = torch.cat([torch.tril(torch.ones(tokens + 1, tokens + 1)), torch.zeros(tokens + 1, image_tokens)], -1)
        mask = torch.cat([mask, torch.ones(image_tokens, tokens + image_tokens + 1)], dim=0)
        if pad:
            mask = torch.cat([torch.zeros(tokens + 1 + image_tokens, pad), mask], dim=-1)
            mask = torch.cat([torch.ones(pad, s.text + image_tokens + 1), mask], dim=0)
        masks.append(mask)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    return dict(
        hidden_states=torch.cat([latents] * 2),
        timestep=_timestep(g, rows) / 1000,
        input_ids=ids,
        input_img_latents=[],
        input_image_sizes={row: [] for row in range(rows)},
        attention_mask=torch.stack(masks).long(),
        position_ids=torch.tensor(positions),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# FramePack (HunyuanVideo I2V): HunyuanVideoFramepackPipeline.__call__, inverted anti-drifting sampling, last section
# (no padding frames). HunyuanVideo's blocks over the window's tokens packed after the clean history's: the first
# image and one clean frame (1x), two frames at 2x and sixteen at 4x downsampling (strided 3D convolutions), each
# with the rotary table of its frame indices; SigLIP image tokens joined to the refined text.
# ---------------------------------------------------------------------------------------------

_FRAMEPACK_HISTORY = (1, 2, 16)  # history_sizes: clean 1x, 2x and 4x frames


def _framepack_build():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return _build(
        HunyuanVideoFramepackTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(4, 6, 6),  # sums to HEAD_DIM
        has_image_proj=True,
        image_proj_dim=_SIGLIP_DIM,
        has_clean_x_embedder=True,
    )


def _framepack_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    grid = (2 * s.height, 2 * s.width)
    window = s.frames  # latent_window_size
    indices = torch.arange(1 + window + sum(_FRAMEPACK_HISTORY))
    prefix, latent, history_1x, history_2x, history_4x = indices.split([1, window, *_FRAMEPACK_HISTORY])
    # history_latents start as zeros; the clean latents are the first image's and the 1x history.
    history = torch.zeros(batch, LATENT_CHANNELS, sum(_FRAMEPACK_HISTORY), *grid)
    clean_1x, clean_2x, clean_4x = history.split(list(_FRAMEPACK_HISTORY), dim=2)
    image_latents = _randn(g, batch, LATENT_CHANNELS, 1, *grid)
    return dict(
        hidden_states=_randn(g, batch, LATENT_CHANNELS, window, *grid),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        image_embeds=_randn(g, batch, _SIGLIP_TOKENS, _SIGLIP_DIM),
        indices_latents=latent,
        guidance=torch.tensor([10.0] * batch) * 1000.0,
        latents_clean=torch.cat([image_latents, clean_1x], dim=2),
        indices_latents_clean=torch.cat([prefix, history_1x]),
        latents_history_2x=clean_2x,
        indices_latents_history_2x=history_2x,
        latents_history_4x=clean_4x,
        indices_latents_history_4x=history_4x,
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# LTX-2: LTX2Pipeline.__call__ (audio and video in one model: packed video latents [B, F*H*W, C] and packed audio
# latents [B, L, C*mel]; each stream has self-attention, cross-attention to its connector's text embeddings (one
# mask for both), and cross-attention to the other stream; coordinates for both rotary tables from the model's
# own rope modules, as the pipeline computes them)
# ---------------------------------------------------------------------------------------------

_LTX2_AUDIO_CHANNELS, _LTX2_MEL_BINS = 2, 4  # audio VAE latent channels, latent mel bins (8 and 16 in the real model)
_LTX2_AUDIO_HEAD_DIM = 8


def _ltx2_build():
    from diffusers import LTX2VideoTransformer3DModel

    return _build(
        LTX2VideoTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER_DIM,
        audio_in_channels=_LTX2_AUDIO_CHANNELS * _LTX2_MEL_BINS,
        audio_out_channels=_LTX2_AUDIO_CHANNELS * _LTX2_MEL_BINS,
        audio_num_attention_heads=HEADS,
        audio_attention_head_dim=_LTX2_AUDIO_HEAD_DIM,
        audio_cross_attention_dim=HEADS * _LTX2_AUDIO_HEAD_DIM,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )


def _ltx2_inputs(seed=0, size="default", batch=1):
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, s.frames, s.height, s.width)
    frame_rate = 24.0
    # audio_num_frames = round(duration * sampling rate / hop length / temporal compression), the pipeline's defaults
    audio_frames = round(((s.frames - 1) * 8 + 1) / frame_rate * 16000 / 160 / 4)
    audio = _randn(g, batch, _LTX2_AUDIO_CHANNELS, audio_frames, _LTX2_MEL_BINS)
    # The model's rope modules, as built from its config: the pipeline calls their prepare_*_coords.
    rope = LTX2AudioVideoRotaryPosEmbed(dim=INNER_DIM, modality="video", num_attention_heads=HEADS)
    audio_rope = LTX2AudioVideoRotaryPosEmbed(dim=HEADS * _LTX2_AUDIO_HEAD_DIM, scale_factors=[4], modality="audio",
                                              num_attention_heads=HEADS)
    return dict(
        hidden_states=latents.permute(0, 2, 3, 4, 1).flatten(1, 3),  # _pack_latents, patch size 1
        audio_hidden_states=audio.transpose(1, 2).flatten(2, 3),  # _pack_audio_latents: [B, L, C * M]
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        audio_encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch),
        sigma=_timestep(g, batch) / 1000,
        encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        audio_encoder_attention_mask=_text_mask(batch, s.text, torch.long),
        num_frames=s.frames,
        height=s.height,
        width=s.width,
        fps=frame_rate,
        audio_num_frames=audio_frames,
        video_coords=rope.prepare_video_coords(batch, s.frames, s.height, s.width, "cpu", fps=frame_rate),
        audio_coords=audio_rope.prepare_audio_coords(batch, audio_frames, "cpu"),
        isolate_modalities=False,
        spatio_temporal_guidance_blocks=None,
        perturbation_mask=None,
        use_cross_timestep=True,
        attention_kwargs=None,
        return_dict=False,
    )


def _both_streams(output) -> torch.Tensor:
    """LTX-2 returns the video and the audio predictions: both, flattened into one tensor to compare."""
    return torch.cat([output[0].flatten(), output[1].flatten()])


# ---------------------------------------------------------------------------------------------
# Krea 2: Krea2Pipeline.__call__ (a stack of tapped text-encoder hidden states per token, [B, L, layers, width],
# fused by attention across the layers axis (per token) and then across the tokens; its mask; 2x2-packed latents;
# timestep t / 1000; (0, row, col) position ids for the image after all-zero text ones)
# ---------------------------------------------------------------------------------------------

_KREA2_TEXT_LAYERS = 3  # tapped text-encoder layers (12 in the real model)


def _krea2_build():
    from diffusers import Krea2Transformer2DModel

    return _build(
        Krea2Transformer2DModel,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=2,  # grouped-query attention, as in the real model
        intermediate_size=2 * INNER_DIM,
        timestep_embed_dim=32,
        text_hidden_dim=TEXT_DIM,
        num_text_layers=_KREA2_TEXT_LAYERS,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=2 * TEXT_DIM,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
    )


def _krea2_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    # Krea2Pipeline.prepare_position_ids: text tokens at the origin, image tokens at (0, row, col).
    image_ids = torch.zeros(s.height, s.width, 3)
    image_ids[..., 1] = torch.arange(s.height)[:, None]
    image_ids[..., 2] = torch.arange(s.width)[None, :]
    return dict(
        hidden_states=_pack_2x2(latents),
        encoder_hidden_states=_randn(g, batch, s.text, _KREA2_TEXT_LAYERS, TEXT_DIM),
        timestep=_timestep(g, batch) / 1000,
        position_ids=torch.cat([torch.zeros(s.text, 3), image_ids.reshape(-1, 3)]),
        encoder_attention_mask=_text_mask(batch, s.text, torch.bool),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# ERNIE-Image: ErnieImagePipeline.__call__ (classifier-free guidance in one batch of 2: the negative then the
# positive prompt's hidden states, zero-padded to the longer with their lengths; float timesteps). The model runs
# sequence-first ([S, B, C]): image then text tokens.
# ---------------------------------------------------------------------------------------------


def _ernie_image_build():
    from diffusers import ErnieImageTransformer2DModel

    return _build(
        ErnieImageTransformer2DModel,
        hidden_size=INNER_DIM,
        num_attention_heads=HEADS,
        num_layers=1,
        ffn_hidden_size=2 * INNER_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        text_in_dim=TEXT_DIM,
        rope_axes_dim=(4, 6, 6),  # sums to HEAD_DIM
    )


def _ernie_image_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    rows = 2 * batch  # negative and positive prompts
    lengths = _text_mask(rows, s.text, torch.long).sum(dim=1)
    text = _randn(g, rows, s.text, TEXT_DIM) * _text_mask(rows, s.text, torch.float32)[..., None]  # _pad_text
    latents = _randn(g, batch, LATENT_CHANNELS, s.height, s.width)
    return dict(
        hidden_states=torch.cat([latents, latents]),
        timestep=_timestep(g, rows),
        text_bth=text[:, : int(lengths.max())],
        text_lens=lengths,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# PRX: PRXPipeline.__call__ (classifier-free guidance in one batch of 2: the negative then the positive prompt's
# T5Gemma hidden states with their boolean tokenizer masks; timestep t / 1000 repeated per row)
# ---------------------------------------------------------------------------------------------


def _prx_build():
    from diffusers import PRXTransformer2DModel

    return _build(
        PRXTransformer2DModel,
        in_channels=LATENT_CHANNELS,
        patch_size=2,
        context_in_dim=TEXT_DIM,
        hidden_size=INNER_DIM,
        mlp_ratio=2.0,
        num_heads=HEADS,
        depth=1,
        axes_dim=[8, 8],  # sums to HEAD_DIM
    )


def _prx_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    rows = 2 * batch  # negative and positive prompts
    latents = _randn(g, batch, LATENT_CHANNELS, 2 * s.height, 2 * s.width)
    return dict(
        hidden_states=torch.cat([latents, latents]),
        timestep=(_timestep(g, 1) / 1000).repeat(rows),
        encoder_hidden_states=_randn(g, rows, s.text, TEXT_DIM),
        attention_mask=_text_mask(rows, s.text, torch.bool),
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# FLUX.3: no pipeline in diffusers 0.42.1; called as its forward documents it (FLUX.2's token layout: image
# tokens one per latent pixel with (t, h, w, l) ids shared over the batch, text ids (0, 0, 0, i); per-token
# modulation, the text at timestep 0)
# ---------------------------------------------------------------------------------------------


def _flux3_build():
    from diffusers import Flux3Transformer2DModel

    return _build(
        Flux3Transformer2DModel,
        in_channels=LATENT_CHANNELS * 4,
        cond_in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        timestep_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),  # sums to HEAD_DIM
    )


def _flux3_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    one = torch.arange(1)
    return dict(
        hidden_states=_randn(g, batch, s.height * s.width, LATENT_CHANNELS * 4),
        encoder_hidden_states=_randn(g, batch, s.text, TEXT_DIM),
        timestep=_timestep(g, batch) / 1000,
        img_ids=torch.cartesian_prod(one, torch.arange(s.height), torch.arange(s.width), one),
        txt_ids=torch.cartesian_prod(one, one, one, torch.arange(s.text)),
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------
# Bria FIBO: BriaFiboPipeline.__call__ (classifier-free guidance in one batch of 2; the text encoder's last two
# hidden states concatenated, plus one of its layers per transformer block, projected and mixed into the block's
# text stream; the text + image mask as a key mask through joint_attention_kwargs when some text is padded; zero
# text ids, (0, row, col) image ids)
# ---------------------------------------------------------------------------------------------

_FIBO_TEXT_ENCODER_DIM = 16  # the text encoder's width (2048 in the real model); prompt embeds are twice it


def _bria_fibo_build():
    from diffusers import BriaFiboTransformer2DModel

    return _build(
        BriaFiboTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * _FIBO_TEXT_ENCODER_DIM,
        axes_dims_rope=[4, 6, 6],  # sums to HEAD_DIM
        text_encoder_dim=_FIBO_TEXT_ENCODER_DIM,
    )


def _bria_fibo_inputs(seed=0, size="default", batch=1):
    g, s = torch.Generator().manual_seed(seed), _size(size)
    rows = 2 * batch  # negative and positive prompts
    text_mask = _text_mask(rows, s.text, torch.float32)  # pad_embedding: zero embeddings past each prompt
    layers = [_randn(g, rows, s.text, _FIBO_TEXT_ENCODER_DIM) * text_mask[..., None] for _ in range(2)]
    latents = _randn(g, batch, s.height * s.width, LATENT_CHANNELS * 4)
    img_ids = torch.zeros(s.height, s.width, 3)
    img_ids[..., 1] = torch.arange(s.height)[:, None]
    img_ids[..., 2] = torch.arange(s.width)[None, :]
    mask = torch.cat([text_mask, torch.ones(rows, s.height * s.width)], dim=1).bool()
    return dict(
        hidden_states=torch.cat([latents, latents]),
        timestep=_timestep(g, 1).expand(rows),
        encoder_hidden_states=torch.cat(layers[::-1], dim=-1),  # hidden_states[-1], hidden_states[-2]
        text_encoder_layers=layers,  # one per block (two blocks), the last layers of the encoder
        joint_attention_kwargs={"attention_mask": mask[:, None, None, :]},
        return_dict=False,
        txt_ids=torch.zeros(s.text, 3),
        img_ids=img_ids.reshape(-1, 3),
    )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _case(name, build, make_inputs, output=_first) -> TinyCase:
    return TinyCase(name=name, build=build, make_inputs=make_inputs, output=output, heads=HEADS)


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
        _case("chroma", _chroma_build, _chroma_inputs),
        _case("cogview4", _cogview4_build, _cogview4_inputs),
        _case("cogview3plus", _cogview3plus_build, _cogview3plus_inputs),
        _case("auraflow", _auraflow_build, _auraflow_inputs),
        _case("allegro", _allegro_build, _allegro_inputs),
        _case("cosmos", _cosmos_build, _cosmos_inputs),
        _case("skyreels_v2", _skyreels_v2_build, _wan_t2v_inputs),
        _case("wan_vace", _wan_vace_build, _wan_vace_inputs),
        _case("hunyuan_video15", _hunyuan_video15_build, _hunyuan_video15_inputs),
        _case("z_image", _z_image_build, _z_image_inputs, output=_stacked_first),
        _case("dit", _dit_build, _dit_inputs),
        _case("easyanimate", _easyanimate_build, _easyanimate_inputs),
        _case("bria", _bria_build, _bria_inputs),
        _case("longcat_image", _longcat_image_build, _longcat_image_inputs),
        _case("ovis_image", _ovis_image_build, _ovis_image_inputs),
        _case("chronoedit", _chronoedit_build, _wan_i2v_inputs),
        _case("kandinsky5", _kandinsky5_build, _kandinsky5_inputs),
        _case("omnigen", _omnigen_build, _omnigen_inputs),
        _case("framepack", _framepack_build, _framepack_inputs),
        _case("ltx2", _ltx2_build, _ltx2_inputs, output=_both_streams),
        _case("krea2", _krea2_build, _krea2_inputs),
        _case("ernie_image", _ernie_image_build, _ernie_image_inputs),
        _case("prx", _prx_build, _prx_inputs),
        _case("flux3", _flux3_build, _flux3_inputs),
        _case("bria_fibo", _bria_fibo_build, _bria_fibo_inputs),
    ]
}
