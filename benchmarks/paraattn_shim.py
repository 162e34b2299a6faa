"""Makes para-attn 0.3.38 (the last release, 2025-07) run on diffusers 0.42.1, for the peer benchmark.

Two incompatibilities, each patched as narrowly as we could, so that what runs is still para-attn's own code:

1. `enable_gqa`. diffusers' attention dispatch now passes `enable_gqa=False` to
   `F.scaled_dot_product_attention`; para-attn's `UnifiedAttnMode` forwards every keyword to its
   Ulysses / ring functions, which have no such parameter. The patch drops the keyword when it is False
   (as a value of True would change the result, it is left in and para-attn raises). Taken from
   ../shared/reference/anchor_flux.py, the script that measured the anchors in ../shared/CONTEXT.md.

2. Wan's rotary embedding. diffusers' `WanRotaryPosEmbed` now returns a tuple `(cos, sin)`, each
   [1, tokens, 1, head_dim]; para-attn's Wan adapter (context_parallel/diffusers_adapters/wan.py) was
   written for the older single complex tensor [1, 1, tokens, head_dim / 2] and splits it with
   `DP.get_assigned_chunk(rotary_emb, dim=-2, group=seq_mesh)`. The patch gives that module (only that
   one) a `DP` whose `get_assigned_chunk`, handed a tuple, splits each tensor along its token dim (1);
   every other call goes to para-attn's own primitives unchanged. The rest of the adapter (its copy of
   the forward, block loop, gathers) runs as released.

para-attn's FLUX adapter needs only the first patch (measured that way in ../shared/CONTEXT.md).
"""
from __future__ import annotations

import types

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    import para_attn.para_attn_interface as interface
    import para_attn.primitives as primitives

    original_call = interface.UnifiedAttnMode._call_unified_attn_func

    def call_without_enable_gqa(self, *args, **kwargs):  # para-attn 0.3.38 predates diffusers passing enable_gqa
        if not kwargs.get("enable_gqa", False):
            kwargs.pop("enable_gqa", None)
        return original_call(self, *args, **kwargs)

    interface.UnifiedAttnMode._call_unified_attn_func = call_without_enable_gqa

    try:
        import para_attn.context_parallel.diffusers_adapters.wan as wan_adapter
    except ImportError:  # a diffusers without Wan: nothing to patch
        wan_adapter = None
    if wan_adapter is not None:
        shim = types.ModuleType("para_attn_primitives_for_wan")
        shim.__dict__.update({k: v for k, v in vars(primitives).items() if not k.startswith("__")})

        def get_assigned_chunk(tensor, dim=0, idx=None, group=None):
            if isinstance(tensor, (tuple, list)):
                # diffusers' Wan rotary embedding: (cos, sin), each [1, tokens, 1, head_dim]
                return type(tensor)(primitives.get_assigned_chunk(t, dim=1, idx=idx, group=group) for t in tensor)
            return primitives.get_assigned_chunk(tensor, dim=dim, idx=idx, group=group)

        shim.get_assigned_chunk = get_assigned_chunk
        wan_adapter.DP = shim
    _applied = True
