"""paracompile: a torch.compile backend that runs diffusion transformers context-parallel."""
from paracompile.backend import paracompile_backend
from paracompile.backend import recent_explanations as explanations
from paracompile.cache import cache_stats, reset_cache
from paracompile.cuda_graphs import release_cuda_graphs
from paracompile.options import Options

__all__ = ["paracompile_backend", "Options", "cache_stats", "explanations", "reset_cache", "release_cuda_graphs"]
__version__ = "0.1.0"
