"""Raw Mistral checkpoints, as Mistral publishes them: params.json with consolidated.safetensors
or consolidated.NN.pth (NN = tensor-parallel rank, slices merged on load).

Tensor names and params.json fields are mapped as transformers' converter maps them. The raw q/k
projections keep each head's rope pairs interleaved (rows 2i and 2i+1 rotate together); our
kernels use the rotate-half layout (rows i and i + D/2), so those rows are permuted on load.
"""
import json
import os
import re
from typing import Callable, Dict, List

import torch

from .loading import Checkpoint, CheckpointError, TensorRef, read_safetensors, read_torch_file

# raw name -> transformers name (fullmatch; \1 is the layer index)
_NAME_MAP = [
    (re.compile(r"tok_embeddings\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"norm\.weight"), "model.norm.weight"),
    (re.compile(r"output\.weight"), "lm_head.weight"),
    (re.compile(r"layers\.(\d+)\.attention_norm\.weight"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.ffn_norm\.weight"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.attention\.w([qkvo])\.weight"), r"model.layers.\1.self_attn.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.feed_forward\.w1\.weight"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"layers\.(\d+)\.feed_forward\.w2\.weight"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"layers\.(\d+)\.feed_forward\.w3\.weight"), r"model.layers.\1.mlp.up_proj.weight"),
]

# Tensor-parallel ranks hold slices of the row-parallel layers along dim 1 (inputs) and of the
# column-parallel ones along dim 0; norms are replicated.
_INPUT_SHARDED = re.compile(r"tok_embeddings\.weight|layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight")
_REPLICATED = re.compile(r"norm\.weight|layers\.\d+\.(attention_norm|ffn_norm)\.weight")

_QK = re.compile(r"layers\.\d+\.attention\.(wq|wk)\.weight")
_PTH_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_SAFETENSORS_FILE = re.compile(r"consolidated.*\.safetensors")


def hf_name(raw_name: str) -> str:
    """The transformers name of a raw tensor; unknown names pass through (reported as unexpected)."""
    for pattern, replacement in _NAME_MAP:
        match = pattern.fullmatch(raw_name)
        if match:
            return match.expand(replacement)
    return raw_name


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head of D rows: hf_row[h*D + j*(D/2) + i] = raw_row[h*D + 2*i + j]."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def config_from_params(params: dict, file: str) -> dict:
    """MistralConfig fields from params.json, the way transformers' converter maps them."""
    if params.get("moe"):
        raise CheckpointError(f"{file}: mixture-of-experts checkpoints are not supported")
    required = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
                "n_heads": "num_attention_heads", "norm_eps": "rms_norm_eps"}
    missing = [key for key in required if key not in params]
    if missing:
        raise CheckpointError(f"{file}: missing field(s) {', '.join(missing)}")
    try:
        config = {name: params[key] for key, name in required.items()}
        config["num_key_value_heads"] = params.get("n_kv_heads", params["n_heads"])
        config["head_dim"] = params.get("head_dim", params["dim"] // params["n_heads"])
        config["rope_theta"] = params.get("rope_theta", 10000.0)
        config["max_position_embeddings"] = params.get("max_seq_len", 32768)
        window = params.get("sliding_window")  # sometimes written as a string
        config["sliding_window"] = None if window is None else int(window)
        config["tie_word_embeddings"] = bool(params.get("tied_embeddings", False))
        if params.get("vocab_size", -1) > 0:
            config["vocab_size"] = params["vocab_size"]
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: invalid value ({error})") from error
    return config


def _permuted(read: Callable[[], torch.Tensor], n_heads: int) -> Callable[[], torch.Tensor]:
    return lambda: interleaved_to_rotate_half(read(), n_heads)


def _merged_ref(name: str, shards: List[Dict[str, torch.Tensor]], files: List[str]) -> TensorRef:
    """One tensor assembled from the tensor-parallel shards (read lazily from their mmaps)."""
    parts = []
    for shard, file in zip(shards, files):
        if name not in shard:
            raise CheckpointError(f"{file}: tensor {name} is missing from this shard (present in {files[0]})")
        parts.append(shard[name])
    if len(parts) == 1 or _REPLICATED.fullmatch(name):
        parts = parts[:1]
        shape, read = tuple(parts[0].shape), lambda: parts[0]
    else:
        dim = 1 if _INPUT_SHARDED.fullmatch(name) else 0
        for part, file in zip(parts, files):
            if part.dim() != 2 or part.shape[1 - dim] != parts[0].shape[1 - dim]:
                raise CheckpointError(f"{file}: tensor {name} has shape {tuple(part.shape)}, which does not "
                                      f"line up with {tuple(parts[0].shape)} in {files[0]}")
        shape = list(parts[0].shape)
        shape[dim] = sum(part.shape[dim] for part in parts)
        shape, read = tuple(shape), lambda: torch.cat(parts, dim=dim)
    file = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"
    nbytes = sum(part.numel() * part.element_size() for part in parts)
    return TensorRef(file, shape, parts[0].dtype, nbytes, read)


def _pth_shards(directory: str, names: List[str]) -> List[str]:
    ranks = sorted((int(_PTH_SHARD.fullmatch(n).group(1)), n) for n in names if _PTH_SHARD.fullmatch(n))
    for expected, (rank, name) in enumerate(ranks):
        if rank != expected:
            raise CheckpointError(f"{directory}: tensor-parallel shard {expected} is missing "
                                  f"(found {', '.join(n for _, n in ranks)})")
    return [os.path.join(directory, name) for _, name in ranks]


def open_raw(directory: str, names: List[str]) -> Checkpoint:
    """Opens a raw Mistral directory; tensors come out under transformers names, q/k permuted."""
    params_file = os.path.join(directory, "params.json")
    try:
        with open(params_file, encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{params_file}: cannot be read ({error})") from error
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_file}: expected a JSON object")
    config = config_from_params(params, params_file)

    raw: Dict[str, TensorRef] = {}
    safetensors_files = sorted(n for n in names if _SAFETENSORS_FILE.fullmatch(n))
    pth_files = _pth_shards(directory, names)
    if safetensors_files:  # each file holds whole tensors
        for name in safetensors_files:
            file = os.path.join(directory, name)
            for key, ref in read_safetensors(file).items():
                if key in raw:
                    raise CheckpointError(f"{file}: tensor {key} is also in {raw[key].file}")
                raw[key] = ref
    elif pth_files:
        shards = [read_torch_file(file) for file in pth_files]
        raw = {key: _merged_ref(key, shards, pth_files) for key in shards[0]}
        for shard, file in zip(shards[1:], pth_files[1:]):
            extra = sorted(set(shard) - set(raw))
            if extra:
                raise CheckpointError(f"{file}: tensor {extra[0]} is not in {pth_files[0]}")
    else:
        raise CheckpointError(f"{directory}: params.json but no consolidated.safetensors or "
                              f"consolidated.NN.pth weights")

    if "vocab_size" not in config and "tok_embeddings.weight" in raw:
        config["vocab_size"] = raw["tok_embeddings.weight"].shape[0]
    heads = {"wq": config["num_attention_heads"], "wk": config["num_key_value_heads"]}
    tensors: Dict[str, TensorRef] = {}
    for key, ref in raw.items():
        match = _QK.fullmatch(key)
        if match:  # shapes are checked against the model before anything is read
            ref = TensorRef(ref.file, ref.shape, ref.dtype, ref.nbytes,
                            _permuted(ref.read, heads[match.group(1)]))
        tensors[hf_name(key)] = ref
    return Checkpoint(directory, config, tensors)
