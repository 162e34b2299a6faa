"""paracompile: a torch.compile backend that runs diffusion transformers context-parallel."""
from paracompile.backend import paracompile_backend
from paracompile.options import Options

__all__ = ["paracompile_backend", "Options"]
__version__ = "0.1.0"
