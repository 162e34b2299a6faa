"""Wan 2.1 text-to-video (1.3B or 14B), context-parallel with paracompile.

    # 480x832, 81 frames, on 2 GPUs, Ulysses over both:
    torchrun --nproc_per_node=2 examples/wan.py --prompt "a cat walks on the grass, realistic" --out out
    # the 14B model at 720x1280 on 8 GPUs, Ulysses 4 x batch 2 (cond and uncond rows on different ranks):
    torchrun --nproc_per_node=8 examples/wan.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers --height 720 --width 1280 \
        --ulysses 4 --batch 2 --threshold 0.08
    # speed without downloads: the published transformer config, random weights and embeddings
    torchrun --nproc_per_node=2 examples/wan.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers --random-weights --steps 5
    # a dry run of this script on a CPU (2 processes, gloo, no Inductor):
    torchrun --nproc_per_node=2 examples/wan.py --random-weights --tiny --layers 1 --height 64 --width 64 \
        --frames 5 --steps 3 --compiler eager

With real weights, every rank runs diffusers' WanPipeline (UMT5 text encoder, VAE in fp32) with the transformer
replaced by the compiled one, and rank 0 saves `OUT/wan_<i>.mp4` (an animated GIF without imageio-ffmpeg).
With guidance (the default, 5.0) the pipeline calls the transformer twice per step, cond and uncond.
"""
from __future__ import annotations

import torch

import common

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# transformer/config.json of the published models (diffusers WanTransformer3DModel).
_WAN21 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
              added_kv_proj_dim=None, rope_max_seq_len=1024)
CONFIGS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": dict(_WAN21, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
TINY = dict(attention_head_dim=16, num_attention_heads=4, text_dim=32, freq_dim=32, ffn_dim=128)
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: the UMT5 embeddings are zero-padded to it
VAE_SCALE, VAE_SCALE_T = 8, 4  # the VAE downsamples 8x in space, 4x in time


def random_weights(args, setup: common.Setup) -> None:
    from diffusers import WanTransformer3DModel

    if args.model not in CONFIGS:
        raise SystemExit(f"--random-weights knows the configs of {sorted(CONFIGS)}, not {args.model!r}")
    config = common.shrink(CONFIGS[args.model], args, ("num_layers",), TINY)
    transformer = common.compile_transformer(common.random_transformer(WanTransformer3DModel, config, setup),
                                             args, setup)
    batch, device, dtype = common.samples_per_prompt(args), setup.device, setup.dtype
    frames = (args.frames - 1) // VAE_SCALE_T + 1
    height, width = args.height // VAE_SCALE, args.width // VAE_SCALE
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same numbers on every rank

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    prompts = [randn(batch, TEXT_TOKENS, config["text_dim"])]
    if args.guidance_scale > 1:
        prompts.append(randn(batch, TEXT_TOKENS, config["text_dim"]))  # the negative prompt
    latents = randn(batch, config["in_channels"], frames, height, width)

    def step_calls(x, t):
        # As WanPipeline: timestep = t.expand(batch), t in [0, 1000] (float32), one call per prompt.
        timestep = torch.full([batch], 1000 * t, device=device, dtype=torch.float32)
        return [dict(hidden_states=x, timestep=timestep, encoder_hidden_states=text, attention_kwargs=None,
                     return_dict=False) for text in prompts]

    tokens = frames * (height // 2) * (width // 2)
    setup.print(f"{args.frames} frames of {args.height}x{args.width}: {tokens} video tokens (latent {frames}x{height}"
                f"x{width}), {TEXT_TOKENS} text tokens (cross-attention), batch {batch}")
    result = common.time_denoising(transformer, step_calls, latents, args, setup)
    common.write_json(args, setup, config, result)


def real_weights(args, setup: common.Setup) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=torch.bfloat16)
    if args.flow_shift is not None:  # diffusers suggests 3.0 for 480p, 5.0 for 720p
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=args.flow_shift)
    pipe.to(setup.device)
    pipe.transformer = common.compile_transformer(pipe.transformer, args, setup)
    pipe.set_progress_bar_config(disable=setup.rank != 0)
    prompt = args.prompt or "A cat walks on the grass, realistic"

    def generate(steps: int, on_step=None):
        return pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_frames=args.frames, guidance_scale=args.guidance_scale, num_inference_steps=steps,
                    num_videos_per_prompt=common.samples_per_prompt(args),
                    generator=torch.Generator().manual_seed(args.seed),  # CPU: the same noise on every rank
                    callback_on_step_end=on_step).frames

    videos = common.time_pipeline(generate, args, setup)
    if setup.rank == 0:
        for i, video in enumerate(videos):
            path = common.save_video(video, args.out / f"wan_{i}", fps=16)
            setup.print(f"saved {path}")


def main() -> None:
    parser = common.parser(__doc__, MODEL, height=480, width=832, steps=50, frames=81)
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--flow-shift", type=float, default=None, help="the scheduler's flow_shift (default: the hub's)")
    args = parser.parse_args()
    setup = common.Setup()
    try:
        (random_weights if args.random_weights else real_weights)(args, setup)
    finally:
        setup.close()


if __name__ == "__main__":
    main()
