"""mistral_ext: fast Mistral inference on our own C++/CUDA kernels, transformers-shaped API."""
from ._library import cuda_kernels_available
from . import ops, reference

__all__ = ["cuda_kernels_available", "ops", "reference"]
__version__ = "0.1.0"
