"""GGUF checkpoints (llama.cpp's format) of the `llama` architecture, which Mistral GGUFs use too.

Tensors are dequantized to float32 with the gguf package. llama.cpp's converter interleaves the
rope pairs of each q/k head (the raw Mistral layout), so those rows are permuted back to the
rotate-half layout. Hyper-parameters come from the `llama.*` metadata; the file has no
sliding window (llama.cpp runs Mistral with full attention) and ties the output projection to
the embeddings when it has no `output.weight`.
"""
import re
from typing import Any, Dict, Tuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from .loading import Checkpoint, CheckpointError, TensorRef
from .raw_format import interleaved_to_rotate_half

SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in
                        ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

_REQUIRED = object()


def hf_name(gguf_name: str) -> str:
    """The transformers name of a GGUF tensor; unknown names pass through (reported as unexpected)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return gguf_name


def _metadata(reader: GGUFReader, file: str):
    def get(key: str, default: Any = _REQUIRED) -> Any:
        if key not in reader.fields:
            if default is _REQUIRED:
                raise CheckpointError(f"{file}: metadata key {key} is missing")
            return default
        value = reader.fields[key].contents()
        return value.item() if isinstance(value, np.generic) else value
    return get


def _config(get, file: str, tensors: Dict[str, Any]) -> dict:
    heads = get("llama.attention.head_count")
    kv_heads = get("llama.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise CheckpointError(f"{file}: per-layer head counts are not supported")
    if get("llama.expert_count", 0):
        raise CheckpointError(f"{file}: mixture-of-experts models are not supported")
    scaling = get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{file}: rope scaling {scaling!r} is not supported")
    hidden = get("llama.embedding_length")
    head_dim = get("llama.attention.key_length", hidden // heads)
    if get("llama.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{file}: partial rotary embeddings (llama.rope.dimension_count "
                              f"{get('llama.rope.dimension_count')} != head_dim {head_dim}) are not supported")
    vocab = get("llama.vocab_size", None)
    if vocab is None and "token_embd.weight" in tensors:  # GGUF lists [hidden, vocab]
        vocab = int(tensors["token_embd.weight"].shape[-1])
    config = {
        "hidden_size": hidden,
        "intermediate_size": get("llama.feed_forward_length"),
        "num_hidden_layers": get("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": get("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": get("llama.context_length"),
        "sliding_window": get("llama.attention.sliding_window", None),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", None),
    }
    if vocab is not None:
        config["vocab_size"] = vocab
    return config


def _reader(tensor, shape: Tuple[int, ...], rope_heads: int):
    def read() -> torch.Tensor:
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type),
                                           dtype=np.float32).reshape(shape))
        return interleaved_to_rotate_half(values, rope_heads) if rope_heads else values
    return read


def open_gguf(file: str) -> Checkpoint:
    """Opens a .gguf file; tensors come out under transformers names as float32."""
    try:
        reader = GGUFReader(file)
    except Exception as error:  # the reader fails with ValueError, OSError, struct or numpy errors
        raise CheckpointError(f"{file}: not a readable GGUF file ({type(error).__name__}: {error})") from error
    get = _metadata(reader, file)
    architecture = get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{file}: GGUF architecture {architecture!r} is not supported "
                              f"(only 'llama', the one Mistral and Llama GGUF files use)")
    by_name = {t.name: t for t in reader.tensors}
    try:
        config = _config(get, file, by_name)
    except (TypeError, ZeroDivisionError) as error:  # metadata of the wrong type or zero heads
        raise CheckpointError(f"{file}: invalid metadata ({error})") from error
    rope_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    tensors: Dict[str, TensorRef] = {}
    for name, tensor in by_name.items():
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{file}: tensor {name} has type {tensor.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
        if tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(f"{file}: tensor {name} is truncated ({tensor.data.nbytes} of "
                                  f"{tensor.n_bytes} bytes)")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dim first
        match = _LAYER_TENSOR.fullmatch(name)
        heads = rope_heads.get(match.group(2), 0) if match else 0
        tensors[hf_name(name)] = TensorRef(file, shape, torch.float32, int(tensor.n_bytes),
                                           _reader(tensor, shape, heads))
    return Checkpoint(file, config, tensors)
