"""mistral_ext: fast Mistral inference on our own C++/CUDA kernels, transformers-shaped API."""
from ._library import cuda_kernels_available
from . import ops, reference
from .cache import RollingCache
from .config import AutoConfig, MistralConfig
from .modeling import (AutoModel, AutoModelForCausalLM, MistralForCausalLM, MistralForSequenceClassification,
                       MistralModel, MistralPreTrainedModel)
from .generation import TextStreamer
from .tokenizer import MistralTokenizer

AutoTokenizer = LlamaTokenizer = MistralTokenizer

__all__ = ["cuda_kernels_available", "ops", "reference", "RollingCache", "AutoConfig", "MistralConfig",
           "AutoModel", "AutoModelForCausalLM", "MistralForCausalLM", "MistralForSequenceClassification",
           "MistralModel", "MistralPreTrainedModel", "MistralTokenizer", "AutoTokenizer", "LlamaTokenizer",
           "TextStreamer"]
__version__ = "0.1.0"
