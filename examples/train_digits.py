"""Trains the digits model (see digits_model.py) on CPU in a few minutes, and saves it to examples/digits_dit/.

    python examples/train_digits.py                      # the committed weights
    python examples/train_digits.py --steps 200 --out /tmp/digits_dit   # a quick try

Flow matching (rectified flow) with FLUX's conventions: x_t = (1 - t) * image + t * noise, the target is the
velocity noise - image, t drawn logit-normal (as SD3 and FLUX train). AdamW, a short warmup then cosine decay,
and an exponential moving average of the weights, which is what gets saved. At the end it samples a grid
(one row per class) to `<out>/samples.png`, so you can see the digits.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import digits_model as digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=digits.WEIGHTS_DIR)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = digits.load_dataset()
    transformer, label_encoder = digits.build()
    model = torch.nn.ModuleDict({"transformer": transformer, "labels": label_encoder}).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{len(images)} digits, {parameters / 1e6:.2f}M parameters, {args.steps} steps of batch {args.batch}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    img_ids, txt_ids = digits.position_ids()

    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="training", mininterval=2)
    running = None
    for step in progress:
        index = torch.randint(len(images), (args.batch,))
        x0, y = images[index], labels[index]
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(args.batch))  # logit-normal
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        text, pooled = model["labels"](y)
        prediction = model["transformer"](hidden_states=digits.pack(xt), encoder_hidden_states=text,
                                          pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                                          return_dict=False)[0]
        loss = F.mse_loss(prediction, digits.pack(noise - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema, (step + 1) / (step + 10))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.4f}")
    train_s = time.perf_counter() - start
    print(f"trained in {train_s:.0f} s, final loss (running mean) {running:.4f}")

    digits.save(ema["transformer"], ema["labels"], args.out, extra={"training": dict(
        steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed, threads=args.threads,
        seconds=round(train_s), final_loss=round(running, 4), torch=torch.__version__)})
    class_labels = torch.arange(digits.NUM_CLASSES).repeat_interleave(8)
    noise = torch.randn(len(class_labels), 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(1))
    samples = digits.sample(ema["transformer"], ema["labels"], class_labels, noise, args.sample_steps)
    digits.to_grid(samples, columns=8).save(args.out / "samples.png")
    print(f"saved {args.out / 'model.safetensors'} and {args.out / 'samples.png'}")


if __name__ == "__main__":
    main()
