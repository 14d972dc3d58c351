"""Loads the compiled op library (mistral_ext._C) and says what it holds."""
import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.mistral_ext.*)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "mistral_ext's compiled kernels are missing: build them with "
        "`pip install --no-build-isolation -e .` from the source tree") from error


def cuda_kernels_available() -> bool:
    """True when the compiled library carries CUDA kernels (whether or not a GPU is present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mistral_ext::rms_norm", "CUDA")
