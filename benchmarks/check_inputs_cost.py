"""What `check_inputs` costs per call: a FLUX-shaped step with and without the ranks' input check.

    torchrun --nproc_per_node=2 benchmarks/check_inputs_cost.py --out check_inputs_cost.json
    torchrun --nproc_per_node=2 benchmarks/check_inputs_cost.py --tiny      # a dry run on a CPU (gloo)

The model is diffusers' FluxTransformer2DModel with FLUX.1-dev's dimensions (benchmarks/fbcache_step.py's
config and inputs), `--blocks` double and `--single-blocks` single blocks (19 and 38: the full model), bf16,
compiled once with paracompile (Ulysses over all ranks, `check_inputs="off"`). Two setups then run in
interleaved rounds (A B A B ...), `--steps` calls each after one warm-up call:

- off: the compiled call alone;
- always: `paracompile.runtime.verify_same_on_every_rank` on the call's data inputs (what
  `check_inputs="always"` runs before every call after the first), then the compiled call.

Per setup: the median over rounds of each round's median step time (a barrier and a device synchronize
around every call), and the spread. Also timed alone, the check of the data inputs and the first call's
check of every input (the weights included). Writes a JSON (rank 0) to --out and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

from fbcache_step import flux_config, flux_inputs, synchronize  # benchmarks/ is sys.path[0]
from paracompile import paracompile_backend
from paracompile.runtime import readable_input_name, verify_same_on_every_rank


def tensor_inputs(model, inputs: dict, with_weights: bool) -> list:
    entries = [(name, value) for name, value in inputs.items() if isinstance(value, torch.Tensor)]
    if with_weights:
        entries += [(f"self.{name}", p) for name, p in model.named_parameters()]
    return entries


def timed(function, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        synchronize()
        dist.barrier()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=19)
    parser.add_argument("--single-blocks", type=int, default=38)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.blocks, args.single_blocks, args.resolution, args.text_tokens = 1, 2, 128, 16

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = flux_config(args)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).to(device=device, dtype=dtype).eval()
    inputs = flux_inputs(args.resolution, args.text_tokens, config, device, dtype)
    options = {"mesh": {"ulysses": world}, "check_inputs": "off"}
    if not cuda:
        options["compiler"] = "eager"
    compiled = torch.compile(model, backend=lambda gm, example: paracompile_backend(gm, example, options=options))

    data = tensor_inputs(model, inputs, with_weights=False)
    everything = tensor_inputs(model, inputs, with_weights=True)
    setups = {
        "off": lambda: compiled(**inputs),
        "always": lambda: (verify_same_on_every_rank(data), compiled(**inputs)),
    }
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(**inputs)
        synchronize()
        first_call_s = time.perf_counter() - start
        for setup in setups.values():
            setup()
        rounds = {name: [] for name in setups}
        for _ in range(args.rounds):
            for name, setup in setups.items():
                rounds[name].append(statistics.median(timed(setup, args.steps)))
        check_data = statistics.median(timed(lambda: verify_same_on_every_rank(data), 20))
        check_all = statistics.median(timed(lambda: verify_same_on_every_rank(everything), 3))

    result = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world,
        torch=torch.__version__, date=datetime.date.today().isoformat(),
        command="torchrun --nproc_per_node=%d %s" % (world, " ".join(shlex.quote(a) for a in sys.argv)),
        config=dict(blocks=args.blocks, single_blocks=args.single_blocks, resolution=args.resolution,
                    text_tokens=args.text_tokens, dtype=str(dtype)),
        first_call_s=round(first_call_s, 1), steps_per_round=args.steps,
        rounds={name: [round(t, 3) for t in times] for name, times in rounds.items()},
        median_ms={name: round(statistics.median(times), 3) for name, times in rounds.items()},
        spread_ms={name: [round(min(times), 3), round(max(times), 3)] for name, times in rounds.items()},
        check_data_inputs_alone_ms=round(check_data, 3),
        check_every_input_alone_ms=round(check_all, 3),
        data_inputs=[(readable_input_name(name), list(t.shape)) for name, t in data],
        weights=len(everything) - len(data),
        weight_elements=sum(t.numel() for _, t in everything[len(data):]),
    )
    if rank == 0:
        lines = [f"check_inputs cost, {result['device']} x{world}, torch {result['torch']}, {result['date']}",
                 f"`{result['command']}`", "",
                 "| setup | ms / step (median of round medians) | spread of round medians |", "|---|---|---|"]
        for name in setups:
            low, high = result["spread_ms"][name]
            lines.append(f"| {name} | {result['median_ms'][name]} | {low} - {high} |")
        lines += ["", f"check of the data inputs alone: {check_data:.3f} ms; first call's check of every input "
                      f"({result['weights']} weights, {result['weight_elements'] / 1e9:.2f} G elements): "
                      f"{check_all:.3f} ms"]
        print("\n".join(lines))
        print("RESULT " + json.dumps(result))
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=1)
            with open(args.out.replace(".json", ".md"), "w") as handle:
                handle.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
