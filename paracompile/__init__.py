"""paracompile: a torch.compile backend that runs diffusion transformers context-parallel."""
from paracompile.backend import paracompile_backend
from paracompile.cache import cache_stats, reset_cache
from paracompile.options import Options

__all__ = ["paracompile_backend", "Options", "cache_stats", "reset_cache"]
__version__ = "0.1.0"
