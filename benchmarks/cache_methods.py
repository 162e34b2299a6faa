"""The block caches the benchmarks compare, by name: the options that select each (see the README's First
Block Cache section). `fbcache` is ParaAttention's First Block Cache; `dbcache_fXbY` is cache-dit's DBCache
with X front blocks (always run, their residual decides) and Y back blocks (always run after the cached
ones); `taylorseerN` predicts the cached residual with TaylorSeer of order N instead of reusing it."""
from __future__ import annotations

METHODS = {
    "fbcache": {},
    "taylorseer1": {"fbcache_taylorseer_order": 1},
    "taylorseer2": {"fbcache_taylorseer_order": 2},
    # For the digits model (2 double + 8 single blocks).
    "dbcache_f2b1": {"fbcache_front_blocks": 2, "fbcache_back_blocks": 1},
    "dbcache_f2b1_taylorseer1": {"fbcache_front_blocks": 2, "fbcache_back_blocks": 1, "fbcache_taylorseer_order": 1},
    # For full-size FLUX (19 + 38 blocks): cache-dit's default F8B0, and F1B1.
    "dbcache_f8b0": {"fbcache_front_blocks": 8},
    "dbcache_f8b0_taylorseer1": {"fbcache_front_blocks": 8, "fbcache_taylorseer_order": 1},
    "dbcache_f1b1": {"fbcache_back_blocks": 1},
}
