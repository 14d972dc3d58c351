"""GGUF checkpoints (llama.cpp's format) of the `llama` architecture, which Mistral GGUFs use too.

The header (metadata and tensor index) comes from gguf_file.py; each tensor is a view of a
read-only memory map of the file, dequantized to float32 with the gguf package. llama.cpp's
converter interleaves the rope pairs of each q/k head (the raw Mistral layout), so those rows are
permuted back to the rotate-half layout. Hyper-parameters come from the `llama.*` metadata; the
file has no sliding window (llama.cpp runs Mistral with full attention) and ties the output
projection to the embeddings when it has no `output.weight`.
"""
import re
from typing import Any, Dict, Tuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .gguf_file import GGUFHeader, TensorInfo, read_gguf
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


def _metadata(metadata: Dict[str, Any], file: str):
    def get(key: str, default: Any = _REQUIRED) -> Any:
        if key not in metadata:
            if default is _REQUIRED:
                raise CheckpointError(f"{file}: metadata key {key} is missing")
            return default
        return metadata[key]
    return get


def _config(get, file: str, tensors: Dict[str, TensorInfo]) -> dict:
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
        vocab = tensors["token_embd.weight"].dims[-1]
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


def _tensor_type(tensor: TensorInfo, file: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(tensor.type)
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{file}: tensor {tensor.name} has type {tensor.type if qtype is None else qtype.name}, "
            f"which is not supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    return qtype


def _tensor_data(file_map: np.memmap, header: GGUFHeader, tensor: TensorInfo,
                 qtype: GGMLQuantizationType, file: str) -> np.ndarray:
    """The tensor's bytes as gguf.quants.dequantize takes them: typed values for F32/F16,
    otherwise uint8 [rows, bytes per row]."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row = tensor.dims[0] if tensor.dims else 1
    if row % block:
        raise CheckpointError(f"{file}: tensor {tensor.name} has rows of {row} values, not a multiple "
                              f"of the {qtype.name} block size {block}")
    rows = int(np.prod(tensor.dims[1:], dtype=np.int64))
    start = header.data_offset + tensor.offset
    end = start + rows * row // block * block_bytes
    if end > header.file_size:
        raise CheckpointError(f"{file}: not a readable GGUF file (tensor {tensor.name} is truncated: its "
                              f"bytes end at {end}, the file at {header.file_size})")
    data = file_map[start:end].reshape(rows, row // block * block_bytes)
    if qtype == GGMLQuantizationType.F32:
        return data.view(np.float32)
    return data.view(np.float16) if qtype == GGMLQuantizationType.F16 else data


def _reader(data: np.ndarray, qtype: GGMLQuantizationType, shape: Tuple[int, ...], rope_heads: int):
    def read() -> torch.Tensor:
        values = torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(shape))
        return interleaved_to_rotate_half(values, rope_heads) if rope_heads else values
    return read


def open_gguf(file: str) -> Checkpoint:
    """Opens a .gguf file; tensors come out under transformers names as float32."""
    try:
        header = read_gguf(file)
    except (ValueError, OSError) as error:
        reason = str(error).removeprefix(f"{file}: ")
        raise CheckpointError(f"{file}: not a readable GGUF file ({reason})") from error
    if header.byte_order != "<":  # gguf.quants reads block scales and floats as little-endian
        raise CheckpointError(f"{file}: big-endian GGUF files are not supported")
    get = _metadata(header.metadata, file)
    architecture = get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{file}: GGUF architecture {architecture!r} is not supported "
                              f"(only 'llama', the one Mistral and Llama GGUF files use)")
    by_name = {t.name: t for t in header.tensors}
    try:
        config = _config(get, file, by_name)
    except (TypeError, ZeroDivisionError) as error:  # metadata of the wrong type or zero heads
        raise CheckpointError(f"{file}: invalid metadata ({error})") from error
    rope_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    file_map = np.memmap(file, dtype=np.uint8, mode="r")
    tensors: Dict[str, TensorRef] = {}
    for name, tensor in by_name.items():
        qtype = _tensor_type(tensor, file)
        data = _tensor_data(file_map, header, tensor, qtype, file)
        shape = tuple(reversed(tensor.dims))  # GGUF lists the fastest dim first
        match = _LAYER_TENSOR.fullmatch(name)
        heads = rope_heads.get(match.group(2), 0) if match else 0
        tensors[hf_name(name)] = TensorRef(file, shape, torch.float32, data.nbytes,
                                           _reader(data, qtype, shape, heads))
    return Checkpoint(file, config, tensors)
