"""The header of a GGUF file (llama.cpp's format): key/value metadata and the tensor index.

Parsed with struct over a memory map, values straight to Python objects: much faster than the
gguf package's reader, which builds numpy fields for every item of the vocabulary arrays.
Tensor types stay raw numbers here; the checkpoint loader maps them to the gguf package's enum.
"""
import mmap
import os
import struct
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np

# GGUF value types: struct format of the scalars, bool, string (8) and array (9).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_BOOL, _STRING, _ARRAY, _UINT64 = 7, 8, 9, 10

DEFAULT_ALIGNMENT = 32


class TensorInfo(NamedTuple):
    name: str
    dims: Tuple[int, ...]  # fastest-varying dimension first, as GGUF lists them
    type: int              # a GGMLQuantizationType value
    offset: int            # from the start of the data section


class GGUFHeader(NamedTuple):
    metadata: Dict[str, Any]
    tensors: List[TensorInfo]
    data_offset: int       # where the data section starts in the file
    file_size: int
    byte_order: str        # "<" or ">", as struct and numpy spell it


class _Reader:
    """Reads values one after another; `what` names the item in errors ("metadata 'general.name'")."""

    def __init__(self, buffer, endian: str, path: str):
        self.buffer, self.endian, self.path, self.offset = buffer, endian, path, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(self.endian + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self, what: str) -> str:
        length = self.scalar("Q")
        if length > len(self.buffer) - self.offset:
            raise struct.error("string runs past the end of the file")
        raw = self.buffer[self.offset:self.offset + length]
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: {what} holds invalid UTF-8 ({error})") from None

    def array(self, item_type: int, count: int, what: str) -> list:
        if item_type in _SCALAR_FORMATS or item_type == _BOOL:
            fmt = "B" if item_type == _BOOL else _SCALAR_FORMATS[item_type]
            dtype = np.dtype(fmt).newbyteorder(self.endian)
            if count * dtype.itemsize > len(self.buffer) - self.offset:
                raise struct.error("array runs past the end of the file")
            items = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return [bool(item) for item in items] if item_type == _BOOL else items
        return [self.value(item_type, what) for _ in range(count)]

    def value(self, value_type: int, what: str):
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _BOOL:
            return bool(self.scalar("B"))
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.scalar("I")
            return self.array(item_type, self.scalar("Q"), what)
        raise ValueError(f"{self.path}: {what} has unknown GGUF value type {value_type}")

    def tensor_info(self) -> TensorInfo:
        name = self.string("a tensor name")
        dims = tuple(self.array(_UINT64, self.scalar("I"), f"tensor {name}"))
        return TensorInfo(name, dims, self.scalar("I"), self.scalar("Q"))


def _data_offset(end_of_header: int, metadata: Dict[str, Any], path: str) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a power of two")
    return -(-end_of_header // alignment) * alignment


def read_gguf(path: str) -> GGUFHeader:
    """A GGUF file's metadata (strings decoded, arrays as lists) and tensor index."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: not a GGUF file (too short)")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buffer[:4])!r})")
            # A big-endian file shows its version byte-swapped: 3 reads as 0x03000000.
            endian = "<" if struct.unpack_from("<I", buffer, 4)[0] < 0x10000 else ">"
            reader = _Reader(buffer, endian, path)
            reader.offset = 4
            version = reader.scalar("I")
            if version not in (2, 3):
                raise ValueError(f"{path}: unsupported GGUF version {version} (2 and 3 are)")
            try:
                tensor_count, metadata = reader.scalar("Q"), {}
                for _ in range(reader.scalar("Q")):
                    key = reader.string("a metadata key")
                    if key in metadata:
                        raise ValueError(f"{path}: metadata key {key!r} appears twice")
                    metadata[key] = reader.value(reader.scalar("I"), f"metadata {key!r}")
                tensors = [reader.tensor_info() for _ in range(tensor_count)]
                if len({tensor.name for tensor in tensors}) != len(tensors):
                    raise ValueError(f"{path}: a tensor name appears twice")
            except (struct.error, ValueError) as error:
                if str(error).startswith(path):
                    raise
                raise ValueError(f"{path}: truncated or corrupt GGUF metadata ({error})") from None
    return GGUFHeader(metadata, tensors, _data_offset(reader.offset, metadata, path), size, endian)


def read_gguf_metadata(path: str) -> Dict[str, Any]:
    """Every key/value pair of a GGUF file's header (strings decoded, arrays as lists)."""
    return read_gguf(path).metadata
