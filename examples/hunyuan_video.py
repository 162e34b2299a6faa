"""HunyuanVideo text-to-video, context-parallel with paracompile.

    # 320x512, 61 frames, 30 steps on 2 GPUs, Ulysses over both:
    torchrun --nproc_per_node=2 examples/hunyuan_video.py --height 320 --width 512 --frames 61 --steps 30 \
        --prompt "A cat walks on the grass, realistic" --out out
    # the pipeline's defaults (720x1280, 129 frames, 50 steps) on 8 GPUs, Ulysses 4 x ring 2, First Block Cache:
    torchrun --nproc_per_node=8 examples/hunyuan_video.py --ulysses 4 --ring 2 --threshold 0.08
    # speed without downloads: the published transformer config, random weights and embeddings
    torchrun --nproc_per_node=2 examples/hunyuan_video.py --random-weights --steps 5
    # a dry run of this script on a CPU (2 processes, gloo, no Inductor):
    torchrun --nproc_per_node=2 examples/hunyuan_video.py --random-weights --tiny --layers 1 --height 64 \
        --width 64 --frames 5 --steps 3 --compiler eager

With real weights, every rank runs diffusers' HunyuanVideoPipeline (Llama and CLIP text encoders, VAE with
tiling, in fp16; the transformer in bf16) with the transformer replaced by the compiled one, and rank 0 saves
`OUT/hunyuan_video_<i>.mp4` (an animated GIF without imageio-ffmpeg).
"""
from __future__ import annotations

import torch

import common

MODEL = "hunyuanvideo-community/HunyuanVideo"

# transformer/config.json of the published model (diffusers HunyuanVideoTransformer3DModel).
CONFIGS = {
    "hunyuanvideo-community/HunyuanVideo": dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56)),
}
TINY = dict(num_attention_heads=4, attention_head_dim=16, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6))
TEXT_TOKENS = 256  # HunyuanVideoPipeline's max_sequence_length (Llama hidden states, after the template crop)
PROMPT_TOKENS = 64  # the valid (unpadded) ones in the attention mask
VAE_SCALE, VAE_SCALE_T = 8, 4  # the VAE downsamples 8x in space, 4x in time


def random_weights(args, setup: common.Setup) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    if args.model not in CONFIGS:
        raise SystemExit(f"--random-weights knows the configs of {sorted(CONFIGS)}, not {args.model!r}")
    config = common.shrink(CONFIGS[args.model], args, ("num_layers", "num_single_layers"), TINY)
    transformer = common.compile_transformer(
        common.random_transformer(HunyuanVideoTransformer3DModel, config, setup), args, setup)
    batch, device, dtype = common.samples_per_prompt(args), setup.device, setup.dtype
    frames = (args.frames - 1) // VAE_SCALE_T + 1
    height, width = args.height // VAE_SCALE, args.width // VAE_SCALE
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same numbers on every rank

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # What HunyuanVideoPipeline passes (guidance_scale 6.0, no true CFG by default).
    mask = (torch.arange(TEXT_TOKENS) < PROMPT_TOKENS).to(device, dtype).expand(batch, -1)
    fixed = dict(
        encoder_hidden_states=randn(batch, TEXT_TOKENS, config["text_embed_dim"]),
        encoder_attention_mask=mask,
        pooled_projections=randn(batch, config["pooled_projection_dim"]),
        guidance=torch.full([batch], 6.0 * 1000, device=device, dtype=dtype),
        attention_kwargs=None,
        return_dict=False,
    )
    latents = randn(batch, config["in_channels"], frames, height, width)

    def step_calls(x, t):
        return [dict(hidden_states=x, timestep=torch.full([batch], 1000 * t, device=device, dtype=dtype), **fixed)]

    tokens = frames * (height // 2) * (width // 2)
    setup.print(f"{args.frames} frames of {args.height}x{args.width}: {tokens} video + {TEXT_TOKENS} text tokens "
                f"({PROMPT_TOKENS} unmasked), batch {batch}")
    result = common.time_denoising(transformer, step_calls, latents, args, setup)
    common.write_json(args, setup, config, result)


def real_weights(args, setup: common.Setup) -> None:
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    transformer = HunyuanVideoTransformer3DModel.from_pretrained(args.model, subfolder="transformer",
                                                                 torch_dtype=torch.bfloat16)
    pipe = HunyuanVideoPipeline.from_pretrained(args.model, transformer=transformer, torch_dtype=torch.float16)
    pipe.vae.enable_tiling()
    pipe.to(setup.device)
    pipe.transformer = common.compile_transformer(pipe.transformer, args, setup)
    pipe.set_progress_bar_config(disable=setup.rank != 0)
    prompt = args.prompt or "A cat walks on the grass, realistic"

    def generate(steps: int, on_step=None):
        return pipe(prompt=prompt, height=args.height, width=args.width, num_frames=args.frames,
                    num_inference_steps=steps, num_videos_per_prompt=common.samples_per_prompt(args),
                    generator=torch.Generator().manual_seed(args.seed),  # CPU: the same noise on every rank
                    callback_on_step_end=on_step).frames

    videos = common.time_pipeline(generate, args, setup)
    if setup.rank == 0:
        for i, video in enumerate(videos):
            path = common.save_video(video, args.out / f"hunyuan_video_{i}", fps=15)
            setup.print(f"saved {path}")


def main() -> None:
    args = common.parser(__doc__, MODEL, height=720, width=1280, steps=50, frames=129).parse_args()
    setup = common.Setup()
    try:
        (random_weights if args.random_weights else real_weights)(args, setup)
    finally:
        setup.close()


if __name__ == "__main__":
    main()
