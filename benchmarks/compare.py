"""Benchmark harness: paracompile against one GPU and against the peers, one workload, one machine, one run.

    python3 benchmarks/compare.py --workload flux --out /tmp/compare \\
        --setups eager1,inductor1,paracompile_ulysses2,paracompile_ring2,diffusers_ulysses2,diffusers_ring2,paraattn_ulysses2,paraattn_ring2

Setups (each in its own process; the 2-GPU ones under `torchrun --standalone --nproc_per_node=2`):

| name | what runs |
|---|---|
| eager1 | one GPU, the model as it is (its output is saved as the reference the others are compared with) |
| inductor1 | one GPU, `torch.compile(model)` |
| paracompile_ulysses2 / _ring2 | two GPUs, `torch.compile(model, backend=paracompile_backend, options={"mesh": {"ulysses"/"ring": 2}})` |
| diffusers_ulysses2 / _ring2 | two GPUs, diffusers' native context parallelism (`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2 / ring_degree=2))`), then `torch.compile(model)` |
| paraattn_ulysses2 / _ring2 | two GPUs, para-attn 0.3.38's `parallelize_transformer` (with benchmarks/paraattn_shim.py), then `torch.compile(model)` |

Workloads, random weights (seeded, the same on every setup and rank, scaled by 0.5 as in
../shared/reference/anchor_flux.py), bf16, one transformer forward per step, inputs built the way the
diffusers 0.42.1 pipeline builds them:

- flux: `FluxTransformer2DModel` with FLUX.1-dev's config (19 double + 38 single blocks, 24 heads x 128),
  1024x1024: 4096 image tokens + 512 text tokens.
- wan: `WanTransformer3DModel` with Wan2.1-T2V-1.3B's config (30 blocks, 12 heads x 128, ffn 8960),
  480x832, 81 frames: latents [1, 16, 21, 60, 104], 32760 tokens; 512 text tokens x 4096.

Each worker prints one line `RESULT {json}`: median per-step latency after --warmup steps (the slowest rank's
time of each step, ranks released together by a barrier), wall time of the first call (compile included;
Inductor's cache stays where torch puts it, so a rerun on the same machine may compile faster: each result
records how many files the cache held when it started), peak memory, output statistics, and the output's
difference from eager1's (saved in --out). A failing setup records its error and the harness goes on.
Results are merged into --out/compare_<workload>.json and .md after every setup (the name gains `_tiny` or
`_blocks...` for those variants), so repeated invocations with the same --out (a warm machine, one group of
setups per call) build up one table; `--merge a.json b.json --out DIR` joins JSON files from separate
calls (a later result wins, except a setup that did not run or was cut off by --deadline). The markdown
names every host the results came from. On the device machine, benchmarks/run_compare.sh installs the
wheels, sets the environment and copies the results to $OUT.

`--interleaved --nproc N` hands the run to benchmarks/rounds.py: every setup in one process group of N ranks
(any N; e.g. `--nproc 4 --setups inductor1,pc_ulysses,pc_ring,pc_u2r2,diffusers_ulysses,diffusers_ring,paraattn_ulysses`),
timed in interleaved rounds, with each setup's round medians, spread, GPU busy time and kernels per step.

`--tiny` is a dry run on a CPU: tiny configs, float32, gloo, paracompile with compiler="eager", peers
compiled with backend="eager", inductor1 through Inductor with scalar C++ kernels; setups that need CUDA
(diffusers' native CP, para-attn's ring) are skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUPS = {
    "eager1": dict(world=1, label="1 GPU eager"),
    "inductor1": dict(world=1, label="1 GPU Inductor (`torch.compile`)"),
    "paracompile_ulysses2": dict(world=2, label="paracompile Ulysses 2"),
    "paracompile_ring2": dict(world=2, label="paracompile Ring 2"),
    "diffusers_ulysses2": dict(world=2, label="diffusers native CP Ulysses 2 + compile"),
    "diffusers_ring2": dict(world=2, label="diffusers native CP Ring 2 + compile"),
    "paraattn_ulysses2": dict(world=2, label="para-attn 0.3.38 Ulysses 2 + compile"),
    "paraattn_ring2": dict(world=2, label="para-attn 0.3.38 Ring 2 + compile"),
}
# On a CPU (--tiny) these cannot run: diffusers' native CP refuses a device without an accelerator, and
# para-attn's ring runs on torch's CUDA ring-attention internals.
NEEDS_CUDA = {
    "diffusers_ulysses2": "diffusers' native context parallelism refuses to run without an accelerator",
    "diffusers_ring2": "diffusers' native context parallelism refuses to run without an accelerator",
    "paraattn_ring2": "para-attn's ring attention needs CUDA",
}
# diffusers' default attention backend ("native") has no log-sum-exp, which ring attention needs.
DIFFUSERS_BACKEND = {"ulysses": "native", "ring": "_native_cudnn"}

TARGETS = {"flux": 1.8, "wan": 1.9}  # paracompile vs one-GPU Inductor on 2x H100, from the issue

FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(FLUX_CONFIG, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
# Wan2.1-T2V-1.3B, as diffusers' scripts/convert_wan_to_diffusers.py writes it (dim 1536 = 12 x 128).
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                  rope_max_seq_len=1024)
WAN_TINY = dict(WAN_CONFIG, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                freq_dim=16, ffn_dim=128, num_layers=2)


def workload_spec(workload: str, tiny: bool, blocks: str | None) -> dict:
    """The model config and input sizes of a workload, and a tag that names non-default variants."""
    if workload == "flux":
        config = dict(FLUX_TINY if tiny else FLUX_CONFIG)
        if blocks:
            double, _, single = blocks.partition(",")
            config.update(num_layers=int(double), num_single_layers=int(single) if single else 2 * int(double))
        # 1024x1024: VAE /8 -> 128x128 latents, packed 2x2 -> 64x64 = 4096 tokens; tiny: 8x8 = 64 tokens
        spec = dict(config=config, side=8 if tiny else 64, text_tokens=8 if tiny else 512)
        spec["tokens"] = spec["side"] ** 2 + spec["text_tokens"]
        spec["description"] = (
            f"`FluxTransformer2DModel`, FLUX.1-dev config ({config['num_layers']} double + "
            f"{config['num_single_layers']} single blocks, {config['num_attention_heads']} heads x "
            f"{config['attention_head_dim']}), " + ("tiny widths, " if tiny else "1024x1024: ")
            + f"{spec['side'] ** 2} image + {spec['text_tokens']} text tokens")
    elif workload == "wan":
        config = dict(WAN_TINY if tiny else WAN_CONFIG)
        if blocks:
            config.update(num_layers=int(blocks.partition(",")[0]))
        # 480x832, 81 frames: VAE /4 in time ((81 - 1) / 4 + 1 = 21), /8 in space -> 60x104; patch (1, 2, 2)
        latents = [1, config["in_channels"], 3, 8, 8] if tiny else [1, 16, 21, 60, 104]
        spec = dict(config=config, latents=latents, text_tokens=8 if tiny else 512)
        spec["tokens"] = latents[2] * (latents[3] // 2) * (latents[4] // 2)
        spec["description"] = (
            f"`WanTransformer3DModel`, Wan2.1-T2V-1.3B config ({config['num_layers']} blocks, "
            f"{config['num_attention_heads']} heads x {config['attention_head_dim']}, ffn {config['ffn_dim']}), "
            + ("tiny widths, " if tiny else "480x832, 81 frames: ")
            + f"latents {latents}, {spec['tokens']} tokens; {spec['text_tokens']} text tokens")
    else:
        raise ValueError(f"unknown workload {workload!r}")
    tag = workload + ("_tiny" if tiny else "") + (f"_blocks{blocks.replace(',', '-')}" if blocks else "")
    spec.update(workload=workload, tag=tag)
    return spec


# ------------------------------------------------------------------------------------------------ worker


def build_model(spec: dict, device, dtype):
    import torch

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if spec["workload"] == "flux":
                from diffusers import FluxTransformer2DModel as cls
            else:
                from diffusers import WanTransformer3DModel as cls
            model = cls(**spec["config"]).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    # from_pretrained(torch_dtype=bf16) keeps these modules (Wan: rope, time_embedder, scale_shift_table,
    # norm1-3) in float32; do the same, with the rule diffusers' loader uses.
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, parameter in model.named_parameters():
        parameter.data.mul_(0.5)  # keeps activations finite with random weights (as anchor_flux.py does)
        if any(module in name.split(".") for module in keep):
            parameter.data = parameter.data.float()
    return model


def init_fake_world(world_size: int) -> None:
    """This process as rank 0 of `world_size` ranks whose collectives move no data (torch's fake process
    group): rank 0's compute of a sharded graph on one GPU. Its collectives never write their outputs, and
    some builds then compute on NaN: Wan's whole graph did, compile_blocks did not, and the NaN process drew
    less power at a higher clock, 11% faster a step with the same kernels
    (benchmarks/results/blocks_step_wan_fake2_1xH200.md). Handing out zeroed memory through the caching
    allocator did not make those outputs finite (rounds_wan_blocks4_fake2_finite_1xH200.md), so the cause is
    not only the allocator's old contents, and it is not fixed here. The benchmarks report whether each
    fake-world output is finite; compare fake-world times only between builds whose outputs are finite, or
    within one interleaved run, and read kernel counts rather than times across processes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def output_finite(output) -> bool:
    import torch

    return bool(torch.isfinite(output).all())


def build_inputs(spec: dict, device, dtype) -> dict:
    import torch

    generator = torch.Generator(device=device).manual_seed(1)
    config = spec["config"]
    if spec["workload"] == "flux":
        # packed latent rows x columns (1024x1024: 64 x 64); spec["rows"] / spec["cols"] for other shapes
        rows, cols, text_tokens = spec.get("rows", spec["side"]), spec.get("cols", spec["side"]), spec["text_tokens"]
        # FluxPipeline._prepare_latent_image_ids: (row, column) per packed latent pixel, in the latents' dtype
        image_ids = torch.zeros(rows, cols, 3)
        image_ids[..., 1] = image_ids[..., 1] + torch.arange(rows)[:, None]
        image_ids[..., 2] = image_ids[..., 2] + torch.arange(cols)[None, :]
        return dict(
            hidden_states=torch.randn(1, rows * cols, config["in_channels"], device=device, dtype=dtype,
                                      generator=generator),
            encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], device=device,
                                              dtype=dtype, generator=generator),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype,
                                           generator=generator),
            # the pipeline: t.expand(batch).to(latents.dtype) / 1000; guidance in float32
            timestep=torch.full([1], 500.0, device=device).to(dtype) / 1000,
            guidance=torch.full([1], 3.5, device=device, dtype=torch.float32),
            img_ids=image_ids.reshape(rows * cols, 3).to(device=device, dtype=dtype),
            txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
            return_dict=False,
        )
    # WanPipeline: latents.to(transformer dtype), timestep t.expand(batch) in the scheduler's float32
    return dict(
        hidden_states=torch.randn(*spec["latents"], device=device, dtype=dtype, generator=generator),
        timestep=torch.full([1], 500.0, device=device, dtype=torch.float32),
        encoder_hidden_states=torch.randn(1, spec["text_tokens"], config["text_dim"], device=device, dtype=dtype,
                                          generator=generator),
        return_dict=False,
    )


def prepare(setup: str, model, args, device, world_size: int):
    """Returns (callable model, extra facts for the result)."""
    import torch

    compile_backend = "eager" if args.tiny else "inductor"  # peers in a CPU dry run: Dynamo only
    extra = {}
    if setup == "eager1":
        return model, extra
    if setup == "inductor1":
        if args.tiny:  # scalar C++ kernels compile fast on a small shared CPU
            import torch._inductor.config as inductor_config

            inductor_config.cpp.vec_isa_ok = False
        return torch.compile(model), extra
    style = setup.rsplit("_", 1)[1].rstrip("0123456789")
    if setup.startswith("paracompile_"):
        from paracompile import paracompile_backend

        options = {"mesh": {style: world_size}}
        if args.tiny:
            options["compiler"] = "eager"
        options.update(json.loads(args.paracompile_options) if args.paracompile_options else {})
        extra["paracompile_options"] = options
        return torch.compile(model, backend=paracompile_backend, options=options), extra
    if setup.startswith("diffusers_"):
        from diffusers import ContextParallelConfig

        backend = diffusers_backends(args.diffusers_backend)[style]
        if backend != "native":
            model.set_attention_backend(backend)
        config = ContextParallelConfig(**{f"{style}_degree": world_size})
        model.enable_parallelism(config=config)
        extra["attention_backend"] = backend
        return torch.compile(model, backend=compile_backend), extra
    if setup.startswith("paraattn_"):
        from benchmarks import paraattn_shim

        paraattn_shim.apply()
        from para_attn.context_parallel import init_context_parallel_mesh
        from para_attn.context_parallel.diffusers_adapters import parallelize_transformer

        mesh = init_context_parallel_mesh(device.type, max_ring_dim_size=world_size if style == "ring" else 1)
        parallelize_transformer(model, mesh=mesh)
        extra["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))
        return torch.compile(model, backend=compile_backend), extra
    raise ValueError(f"unknown setup {setup!r}")


def diffusers_backends(option: str | None) -> dict:
    """--diffusers-backend: a backend name for both styles, or 'ulysses=NAME,ring=NAME'."""
    backends = dict(DIFFUSERS_BACKEND)
    for part in (option or "").split(","):
        if part.strip():
            style, _, name = part.strip().rpartition("=")
            backends.update({style: name} if style else {s: name for s in backends})
    return backends


def versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("torch", "diffusers", "para_attn", "triton"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    import torch

    found["torch"] = torch.__version__
    found["cuda"] = torch.version.cuda
    found["python"] = sys.version.split()[0]
    return found


def inductor_cache_files() -> tuple[str, int]:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        path = cache_dir()
    except Exception:  # an older layout
        import tempfile

        path = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                          f"torchinductor_{os.environ.get('USER', '')}")
    count = sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0
    return path, count


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    setup = args.worker
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    result = dict(setup=setup, workload=args.workload, world_size=world_size, rank=rank)
    try:
        cuda = not args.tiny
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (use --tiny for a CPU dry run)")
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(1)  # a dry run: small shapes, small shared machines
        if world_size > 1:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        dtype = torch.bfloat16 if cuda else torch.float32
        spec = workload_spec(args.workload, args.tiny, args.blocks)
        result.update(versions(), device=torch.cuda.get_device_name(device) if cuda else "cpu",
                      device_count=torch.cuda.device_count() if cuda else 0, dtype=str(dtype).replace("torch.", ""),
                      host=socket.gethostname(), date=datetime.datetime.now().isoformat(timespec="seconds"))
        result["inductor_cache_dir"], result["inductor_cache_files_before"] = inductor_cache_files()

        model = build_model(spec, device, dtype)
        inputs = build_inputs(spec, device, dtype)
        runner, extra = prepare(setup, model, args, device, world_size)
        result.update(extra)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def synchronize():
            if world_size > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()

        def step():
            with torch.inference_mode():
                return runner(**inputs)[0]

        synchronize()
        start = time.perf_counter()
        output = step()
        synchronize()
        result["first_call_s"] = round(time.perf_counter() - start, 2)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            synchronize()
            start = time.perf_counter()
            output = step()
            if cuda:
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        if world_size > 1:
            per_rank = [None] * world_size
            dist.all_gather_object(per_rank, times)
        else:
            per_rank = [times]
        slowest = [max(rank_times[i] for rank_times in per_rank) for i in range(len(times))]
        result.update(
            ms=round(median(slowest), 2), ms_min=round(min(slowest), 2), ms_max=round(max(slowest), 2),
            ms_per_rank=[round(median(rank_times), 2) for rank_times in per_rank], steps=args.steps,
            warmup=args.warmup,
            peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        )
        output = output.detach().float().cpu()
        result.update(output_shape=list(output.shape), output_mean=output.mean().item(),
                      output_abs_mean=output.abs().mean().item(), output_nan=bool(output.isnan().any()))
        if rank == 0:
            compare_with_reference(setup, spec, output, args, result)
        if setup.startswith("paracompile_"):
            from paracompile.backend import explanations

            result["explanation"] = explanations[-1] if explanations else None
        result["status"] = "ok"
    except BaseException as error:  # report, then leave (torchrun tears down the other rank)
        traceback.print_exc()
        result["status"] = "not implemented" if "NotImplementedError" in repr(error) + str(error) else "error"
        result["error"] = f"{type(error).__name__}: {error}"[:3000]
        print("RESULT " + json.dumps(result), flush=True)
        sys.stderr.flush()
        os._exit(1)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if world_size > 1:
        dist.destroy_process_group()


def compare_with_reference(setup: str, spec: dict, output, args, result: dict) -> None:
    """eager1 saves its output in --out; the other setups report their difference from it (config checked),
    or from --reference's when --out has none (a call on a fresh machine)."""
    import torch

    path = os.path.join(args.out, f"reference_{spec['tag']}.pt")
    if setup == "eager1":
        torch.save(dict(output=output, config=spec["config"], date=result["date"], host=result["host"]), path)
        result["reference"] = os.path.basename(path)
        return
    if not os.path.exists(path):
        path = args.reference
        if not path or not os.path.exists(path):
            return
    reference = torch.load(path)
    if reference["config"] != spec["config"] or reference["output"].shape != output.shape:
        result["reference_mismatch"] = "eager1's saved output has another config or shape"
        return
    difference = (output - reference["output"]).abs()
    result.update(vs_eager_max_abs=difference.max().item(), vs_eager_mean_abs=difference.mean().item(),
                  reference=os.path.basename(path), reference_host=reference.get("host"))


def median(values: list) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# ----------------------------------------------------------------------------------------------- harness


def launch(setup: str, args, log_path: str, timeout: float) -> dict:
    world = SETUPS[setup]["world"]
    forwarded = ["--workload", args.workload, "--steps", str(args.steps), "--warmup", str(args.warmup), "--out",
                 args.out, "--worker", setup]
    if args.tiny:
        forwarded.append("--tiny")
    if args.blocks:
        forwarded += ["--blocks", args.blocks]
    if args.paracompile_options:
        forwarded += ["--paracompile-options", args.paracompile_options]
    if args.diffusers_backend:
        forwarded += ["--diffusers-backend", args.diffusers_backend]
    if args.reference:
        forwarded += ["--reference", os.path.abspath(args.reference)]
    script = os.path.abspath(__file__)
    if world == 1:
        command = [sys.executable, script] + forwarded
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   script] + forwarded
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    # NVLink multicast stays off on the lent machines (../.library/device/KINDS.md)
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if world > 1 and args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: torchrun and its workers
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
    wall = round(time.perf_counter() - start, 1)
    with open(log_path, errors="replace") as log:
        text = log.read()
    results = []
    for line in text.splitlines():
        position = line.find("RESULT {")
        if position >= 0:
            try:
                results.append(json.loads(line[position + len("RESULT "):]))
            except json.JSONDecodeError:
                pass
    ok = [r for r in results if r.get("status") == "ok"]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        result = sorted(failed, key=lambda r: r.get("rank", 0))[0]
    elif ok and returncode == 0:
        result = ok[0]
    else:
        result = dict(setup=setup, status="timeout" if timed_out else "error",
                      error=(f"no result within {timeout:.0f} s, killed" if timed_out else
                             f"exit code {returncode}, no result line: " + last_error(text)))
    result["command"] = " ".join(shlex.quote(c) for c in command)
    result["process_wall_s"] = wall
    result["log"] = os.path.relpath(log_path, args.out)
    return result


def last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[:1000]
    return (lines[-1] if lines else "(no output)")[:1000]


def load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def merge(into: dict | None, new: dict) -> dict:
    if into is None or into.get("tag") != new.get("tag"):
        return new
    merged = dict(into)
    merged["setups"] = dict(into.get("setups", {}))
    for name, result in new.get("setups", {}).items():
        # a later result wins, except one that did not run at all over one that did
        if result.get("status") in ("not run", "skipped", "cut off") and name in merged["setups"]:
            continue
        merged["setups"][name] = result
    merged["runs"] = into.get("runs", []) + [run for run in new.get("runs", []) if run not in into.get("runs", [])]
    return merged


def write_report(report: dict, out_dir: str) -> str:
    name = f"compare_{report['tag']}"
    with open(os.path.join(out_dir, name + ".json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(out_dir, name + ".md"), "w") as handle:
        handle.write(markdown(report))
    return os.path.join(out_dir, name + ".md")


def markdown(report: dict) -> str:
    setups = report["setups"]
    ordered = [name for name in SETUPS if name in setups] + [name for name in setups if name not in SETUPS]
    facts = next((setups[n] for n in ordered if setups[n].get("torch")), {})
    base = setups.get("inductor1", {}).get("ms") if setups.get("inductor1", {}).get("status") == "ok" else None
    hosts = sorted({setups[n].get("host") for n in ordered if setups[n].get("host")})
    lines = [f"# {report['workload']}: paracompile against one GPU and the peers", ""]
    lines.append(f"- workload: {report['description']}; random weights (seed 0, scaled by 0.5), "
                 f"{facts.get('dtype', '?')}, one transformer forward per step")
    lines.append(f"- device: {facts.get('device', '?')} x {facts.get('device_count', '?')}, "
                 f"host(s): {', '.join(hosts) or '?'}")
    if len(hosts) > 1:
        lines.append("  **results come from more than one machine: compare with care**")
    lines.append(f"- versions: torch {facts.get('torch')}, CUDA {facts.get('cuda')}, diffusers {facts.get('diffusers')}, "
                 f"para-attn {facts.get('para_attn')}, triton {facts.get('triton')}, Python {facts.get('python')}")
    dates = sorted({setups[n].get("date", "")[:10] for n in ordered if setups[n].get("date")})
    lines.append(f"- date: {', '.join(dates) or '?'}")
    lines.append(f"- timing: median over {facts.get('steps', '?')} steps after {facts.get('warmup', '?')} warm-up "
                 "steps of the slowest rank's time per step (ranks start each step together after a barrier); "
                 "first call = wall time of the first forward, compile included")
    lines.append("- command(s):")
    for run in report.get("runs", []):
        lines.append(f"  - `{run['command']}` ({run.get('date', '')})")
    lines += ["", "| setup | ms / step (min-max) | vs 1-GPU Inductor | first call (s) | peak GiB | output abs mean "
              "| max abs vs eager1 (mean) | Inductor cache files at start | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ordered:
        r = setups[name]
        label = SETUPS.get(name, {}).get("label", name)
        if r.get("attention_backend"):
            label += f" (attention backend `{r['attention_backend']}`)"
        if r.get("status") == "ok":
            speed = f"{base / r['ms']:.2f}x" if base else "-"
            difference = (f"{r['vs_eager_max_abs']:.4g} ({r['vs_eager_mean_abs']:.3g})" if "vs_eager_max_abs" in r
                          else ("reference" if name == "eager1" else "-"))
            status = "ok" + (" (NaN in output)" if r.get("output_nan") else "")
            lines.append(f"| {label} | {r['ms']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {speed} | "
                         f"{r['first_call_s']:.1f} | {r.get('peak_gib') if r.get('peak_gib') is not None else '-'} | "
                         f"{r['output_abs_mean']:.4g} | {difference} | {r.get('inductor_cache_files_before', '-')} | "
                         f"{status} |")
        else:
            error = (r.get("error") or r.get("reason") or "").replace("|", "\\|").replace("\n", " ")
            if len(error) > 300:
                error = error[:300] + "..."
            lines.append(f"| {label} | - | - | - | - | - | - | - | {r.get('status')}: {error} |")
    lines += ["", summary(report, base), ""]
    return "\n".join(lines)


def summary(report: dict, base: float | None) -> str:
    setups = report["setups"]
    target = TARGETS.get(report["workload"])
    ours = {n: r for n, r in setups.items() if n.startswith("paracompile_") and r.get("status") == "ok"}
    peers = {n: r for n, r in setups.items() if n.split("_")[0] in ("diffusers", "paraattn") and r.get("status") == "ok"}
    if not ours or not base:
        return "Targets: not assessable (needs inductor1 and a paracompile setup that ran)."
    best_name, best = min(ours.items(), key=lambda item: item[1]["ms"])
    text = f"Best paracompile setup: {best_name}, {best['ms']:.1f} ms, {base / best['ms']:.2f}x one-GPU Inductor"
    if target and not report.get("tiny"):
        text += f" (target {target}x: {'met' if base / best['ms'] >= target else 'not met'})"
    text += "."
    if peers:
        peer_name, peer = min(peers.items(), key=lambda item: item[1]["ms"])
        text += (f" Fastest peer: {peer_name}, {peer['ms']:.1f} ms ({base / peer['ms']:.2f}x); paracompile is "
                 + ("faster." if best["ms"] < peer["ms"] else "NOT faster."))
    missing = [n for n in SETUPS if n.split("_")[0] in ("diffusers", "paraattn") and n not in peers]
    if missing:
        text += f" Peers without a time in this table: {', '.join(missing)}."
    return text


def harness(args) -> None:
    setups = [s.strip() for s in (args.setups or ",".join(SETUPS)).split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setup(s) {unknown}; choose among {list(SETUPS)}")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    args.out = os.path.abspath(args.out)
    spec = workload_spec(args.workload, args.tiny, args.blocks)
    command = os.environ.get("COMPARE_COMMAND") or "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    report = dict(workload=args.workload, tag=spec["tag"], tiny=args.tiny, description=spec["description"],
                  config=spec["config"], tokens=spec["tokens"], runs=[dict(command=command, date=now)], setups={})
    path = os.path.join(args.out, f"compare_{spec['tag']}.json")
    report = report if args.fresh else merge(load(path), report)
    started = time.monotonic()
    for setup in setups:
        print(f"[{time.strftime('%H:%M:%S')}] {args.workload} {setup} ...", flush=True)
        timeout = args.setup_timeout
        if args.deadline:
            timeout = min(timeout, args.deadline - (time.monotonic() - started))
        if args.tiny and setup in NEEDS_CUDA:
            result = dict(setup=setup, status="skipped", reason=f"CPU dry run: {NEEDS_CUDA[setup]}")
        elif timeout < 30:
            if setup in report["setups"]:  # keep what an earlier call measured
                print("    not run: --deadline reached; keeping the earlier result", flush=True)
                continue
            result = dict(setup=setup, status="not run", reason=f"--deadline {args.deadline} s reached before it")
        else:
            result = launch(setup, args, os.path.join(args.out, "logs", f"{spec['tag']}_{setup}.log"), timeout)
            if result["status"] == "timeout" and timeout < args.setup_timeout:
                result.update(status="cut off", error=f"killed at --deadline {args.deadline:.0f} s (it had "
                                                      f"{timeout:.0f} s)")
                if report["setups"].get(setup, {}).get("status") == "ok":
                    print("    killed at --deadline; keeping the earlier result", flush=True)
                    continue
        report["setups"][setup] = result
        if result.get("status") == "ok":
            print(f"    {result['ms']:.2f} ms/step, first call {result['first_call_s']:.1f} s, "
                  f"output abs mean {result['output_abs_mean']:.4g}"
                  + (f", max abs vs eager1 {result['vs_eager_max_abs']:.4g}" if "vs_eager_max_abs" in result else ""),
                  flush=True)
        else:
            print(f"    {result['status']}: {result.get('error') or result.get('reason')}"[:600], flush=True)
        write_report(report, args.out)  # after every setup: a call cut short keeps what it measured
    print(open(write_report(report, args.out)).read())


def merge_files(args) -> None:
    report = None
    for path in args.merge:
        report = merge(report, load(path))
    os.makedirs(args.out, exist_ok=True)
    print(open(write_report(report, args.out)).read())


INTERLEAVED_DEFAULT = "inductor1,pc_ulysses,pc_ring,diffusers_ulysses,paraattn_ulysses"


def interleaved(args) -> None:
    """The same workloads, timed by benchmarks/rounds.py in one process group of any size."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.join(REPO, "benchmarks", "rounds.py"), "--workload", args.workload, "--setups", args.setups,
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--out", args.out]
    for flag, value in (("--blocks", args.blocks), ("--paracompile-options", args.paracompile_options)):
        if value:
            command += [flag, value]
    if args.tiny:
        command.append("--tiny")
    raise SystemExit(subprocess.call(command, cwd=REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["flux", "wan"], default="flux")
    parser.add_argument("--setups", default=None, help="comma list among " + ", ".join(SETUPS) + " (all by default); "
                        "with --interleaved, rounds.py's names (default: " + INTERLEAVED_DEFAULT + ")")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first call")
    parser.add_argument("--out", default="benchmarks/results/compare", help="results folder")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny configs, float32, gloo")
    parser.add_argument("--blocks", default=None,
                        help="fewer blocks for a quick run: flux 'D,S' (double, single; 'D' alone means D,2D), wan 'N'")
    parser.add_argument("--paracompile-options", default=None,
                        help='JSON merged into the paracompile options, e.g. \'{"inductor": {...}}\'')
    parser.add_argument("--diffusers-backend", default=None,
                        help="diffusers attention backend for its native CP: a name, or 'ulysses=NAME,ring=NAME' "
                             "(default: native for Ulysses, _native_cudnn for Ring, which needs the log-sum-exp "
                             "that native lacks)")
    parser.add_argument("--reference", default=None,
                        help="an eager1 output (reference_<tag>.pt from an earlier call) to compare with when --out "
                             "holds none")
    parser.add_argument("--setup-timeout", type=int, default=900, help="seconds before a setup's processes are killed")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole invocation: a setup still running then is killed and recorded "
                             "as a timeout, later ones are not started (for calls with a time limit)")
    parser.add_argument("--fresh", action="store_true", help="start a new table instead of merging into --out's")
    parser.add_argument("--merge", nargs="+", default=None, help="only merge these compare_*.json into --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true",
                        help="run benchmarks/rounds.py instead: every setup in one process group of --nproc ranks, "
                             "timed in interleaved rounds (A B C A B C ...); --setups then takes rounds.py's names "
                             "(inductor1, pc_ulysses, pc_ring, pc_u2r2, diffusers_ulysses, paraattn_ulysses, ...)")
    parser.add_argument("--nproc", type=int, default=2, help="with --interleaved: ranks (GPUs), any number")
    parser.add_argument("--rounds", type=int, default=5, help="with --interleaved: rounds (at least 3 to rank setups)")
    args = parser.parse_args()
    if args.interleaved:
        args.setups = args.setups or INTERLEAVED_DEFAULT
        interleaved(args)
    elif args.worker:
        worker(args)
    elif args.merge:
        merge_files(args)
    else:
        harness(args)


if __name__ == "__main__":
    main()
