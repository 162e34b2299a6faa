"""FLUX.1-dev, context-parallel with paracompile.

    # 1024x1024 on 2 GPUs, Ulysses over both (the weights from the hub, or a local copy):
    torchrun --nproc_per_node=2 examples/flux.py --prompt "a red fox in the snow" --out out
    # 4 GPUs: Ulysses 2 x ring 2, with First Block Cache:
    torchrun --nproc_per_node=4 examples/flux.py --ulysses 2 --ring 2 --threshold 0.08
    # speed without downloads: the published transformer config, random weights and embeddings
    torchrun --nproc_per_node=2 examples/flux.py --random-weights --steps 10
    # a dry run of this script on a CPU (2 processes, gloo, no Inductor):
    torchrun --nproc_per_node=2 examples/flux.py --random-weights --tiny --layers 1 --height 64 --width 64 \
        --steps 3 --compiler eager

With real weights, every rank runs diffusers' FluxPipeline (text encoders, VAE) with the transformer replaced
by the compiled one, and rank 0 saves `OUT/flux_<i>.png`. The per-step times printed come from the pipeline's
step callback and include the scheduler step.
"""
from __future__ import annotations

import torch

import common

MODEL = "black-forest-labs/FLUX.1-dev"

# transformer/config.json of the published models (diffusers FluxTransformer2DModel).
CONFIGS = {
    "black-forest-labs/FLUX.1-dev": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}
CONFIGS["black-forest-labs/FLUX.1-schnell"] = dict(CONFIGS[MODEL], guidance_embeds=False)
TINY = dict(attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
            axes_dims_rope=(4, 6, 6))
TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length: the T5 embeddings are padded to it
VAE_SCALE = 8  # the VAE downsamples 8x; latents are then packed 2x2 into tokens


def random_weights(args, setup: common.Setup) -> dict:
    from diffusers import FluxTransformer2DModel

    if args.model not in CONFIGS:
        raise SystemExit(f"--random-weights knows the configs of {sorted(CONFIGS)}, not {args.model!r}")
    config = common.shrink(CONFIGS[args.model], args, ("num_layers", "num_single_layers"), TINY)
    transformer = common.compile_transformer(common.random_transformer(FluxTransformer2DModel, config, setup),
                                             args, setup)
    batch, device, dtype = common.samples_per_prompt(args), setup.device, setup.dtype
    rows, cols = args.height // (2 * VAE_SCALE), args.width // (2 * VAE_SCALE)
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same numbers on every rank

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # What FluxPipeline passes (see FluxPipeline.__call__ and _prepare_latent_image_ids).
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(cols)[None, :]
    fixed = dict(
        encoder_hidden_states=randn(batch, TEXT_TOKENS, config["joint_attention_dim"]),
        pooled_projections=randn(batch, config["pooled_projection_dim"]),
        guidance=torch.full([batch], 3.5, device=device, dtype=torch.float32) if config["guidance_embeds"] else None,
        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(device, dtype),
        joint_attention_kwargs=None,
        return_dict=False,
    )
    latents = randn(batch, rows * cols, config["in_channels"])

    def step_calls(x, t):
        return [dict(hidden_states=x, timestep=torch.full([batch], t, device=device, dtype=dtype), **fixed)]

    setup.print(f"{args.height}x{args.width}: {rows * cols} image + {TEXT_TOKENS} text tokens, batch {batch}")
    result = common.time_denoising(transformer, step_calls, latents, args, setup)
    common.write_json(args, setup, config, result)


def real_weights(args, setup: common.Setup) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(setup.device)
    pipe.transformer = common.compile_transformer(pipe.transformer, args, setup)
    pipe.set_progress_bar_config(disable=setup.rank != 0)
    prompt = args.prompt or "A cat holding a sign that says hello world"

    def generate(steps: int, on_step=None):
        return pipe(prompt, height=args.height, width=args.width, num_inference_steps=steps,
                    guidance_scale=3.5, num_images_per_prompt=common.samples_per_prompt(args),
                    generator=torch.Generator().manual_seed(args.seed),  # CPU: the same noise on every rank
                    callback_on_step_end=on_step).images

    images = common.time_pipeline(generate, args, setup)
    if setup.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(args.out / f"flux_{i}.png")
        setup.print(f"saved {len(images)} image(s) to {args.out}/flux_*.png")


def main() -> None:
    args = common.parser(__doc__, MODEL, height=1024, width=1024, steps=28).parse_args()
    setup = common.Setup()
    try:
        (random_weights if args.random_weights else real_weights)(args, setup)
    finally:
        setup.close()


if __name__ == "__main__":
    main()
