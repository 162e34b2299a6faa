"""The backend's options: the dict passed as `torch.compile(..., options={...})`, checked and typed."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

MESH_DIM_NAMES = ("batch", "ring", "ulysses")
COMPILERS = ("inductor", "eager")
# When the ranks compare their inputs (paracompile/runtime.py): the first call of each model, every call, never.
CHECK_INPUT_MODES = ("first", "always", "off")
# The block cache's TaylorSeer predictor: derivatives beyond the second amplify the residuals' noise (cache-dit
# and the TaylorSeer paper use 1 or 2).
MAX_TAYLORSEER_ORDER = 4


@dataclass
class Options:
    """See the options table in README.md."""

    mesh: Any = "auto"
    threshold: float = 0.0
    compiler: str = "inductor"
    mode: Optional[str] = None
    inductor: dict = field(default_factory=dict)
    explain: bool = False
    fbcache_warmup: int = 0
    fbcache_max_hits: Optional[int] = None
    fbcache_front_blocks: int = 1
    fbcache_back_blocks: int = 0
    fbcache_taylorseer_order: int = 0
    timestep_arg: Optional[str] = "timestep"
    check_inputs: str = "first"
    cuda_graphs: bool = False
    ulysses_chunks: int = 1
    compile_blocks: bool = False


_TYPES = {
    "threshold": (int, float),
    "compiler": (str,),
    "mode": (str, type(None)),
    "inductor": (dict,),
    "explain": (bool,),
    "fbcache_warmup": (int,),
    "fbcache_max_hits": (int, type(None)),
    "fbcache_front_blocks": (int,),
    "fbcache_back_blocks": (int,),
    "fbcache_taylorseer_order": (int,),
    "timestep_arg": (str, type(None)),
    "check_inputs": (str,),
    "cuda_graphs": (bool,),
    "ulysses_chunks": (int,),
    "compile_blocks": (bool,),
}


def parse_options(raw: Optional[dict]) -> Options:
    """Checks every key and value; a mistake raises ValueError naming the key and what is valid."""
    raw = dict(raw or {})
    valid = [f.name for f in fields(Options)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"paracompile: unknown option(s) {unknown}; valid options are {valid}")
    for key, types in _TYPES.items():
        if key in raw and (not isinstance(raw[key], types) or (bool not in types and isinstance(raw[key], bool))):
            expected = " or ".join(t.__name__ for t in types)
            raise ValueError(f"paracompile: option '{key}' must be {expected}, got {raw[key]!r}")
    options = Options(**raw)
    if options.mode == "reduce-overhead":
        # What users mean by it: the step replayed as CUDA graphs. paracompile's own graphs capture the
        # collectives too (paracompile/cuda_graphs.py); Inductor's cudagraph trees are left off.
        options.cuda_graphs = True
    if options.compiler not in COMPILERS:
        raise ValueError(f"paracompile: option 'compiler' must be one of {list(COMPILERS)}, got {options.compiler!r}")
    if options.threshold < 0:
        raise ValueError(f"paracompile: option 'threshold' must be >= 0, got {options.threshold!r}")
    if options.fbcache_warmup < 0:
        raise ValueError(f"paracompile: option 'fbcache_warmup' must be >= 0, got {options.fbcache_warmup!r}")
    if options.fbcache_max_hits is not None and options.fbcache_max_hits < 1:
        raise ValueError(f"paracompile: option 'fbcache_max_hits' must be >= 1 or None, got {options.fbcache_max_hits!r}")
    if options.fbcache_front_blocks < 1:
        raise ValueError(f"paracompile: option 'fbcache_front_blocks' must be >= 1 (the blocks that always run and "
                         f"decide), got {options.fbcache_front_blocks!r}")
    if options.fbcache_back_blocks < 0:
        raise ValueError(f"paracompile: option 'fbcache_back_blocks' must be >= 0, got {options.fbcache_back_blocks!r}")
    if not 0 <= options.fbcache_taylorseer_order <= MAX_TAYLORSEER_ORDER:
        raise ValueError(f"paracompile: option 'fbcache_taylorseer_order' must be 0 (reuse the cached residual as it "
                         f"is) to {MAX_TAYLORSEER_ORDER} (extrapolate it), got {options.fbcache_taylorseer_order!r}")
    if options.timestep_arg is not None and not options.timestep_arg.isidentifier():
        raise ValueError(f"paracompile: option 'timestep_arg' must name a forward argument (or be None), got "
                         f"{options.timestep_arg!r}")
    if options.ulysses_chunks < 1:
        raise ValueError(f"paracompile: option 'ulysses_chunks' must be >= 1, got {options.ulysses_chunks!r}")
    if options.check_inputs not in CHECK_INPUT_MODES:
        raise ValueError(f"paracompile: option 'check_inputs' must be one of {list(CHECK_INPUT_MODES)}, got "
                         f"{options.check_inputs!r}")
    return options


def inductor_patches(options: Options) -> dict:
    """The Inductor config patches the options ask for: the mode's, then the user's own. With paracompile's
    CUDA graphs on, Inductor's own cudagraphs stay off unless the user's patches turn them on."""
    patches: dict = {}
    if options.mode is not None:
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(options.mode))
    if options.cuda_graphs:
        patches["triton.cudagraphs"] = False
    patches.update(options.inductor)
    return patches
