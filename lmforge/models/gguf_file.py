"""A GGUF file's metadata and tensor index, read with ``struct`` from one memory map.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array: on the
default model's file (49,152 vocabulary strings, 48,900 merges) that is 3-4 s of a 13 s
start-up. ``GGUFFile`` reads the same format (GGUF v2 and v3, ggml's ``docs/gguf.md``) in
~0.1 s, and gives each tensor the same numpy view ``GGUFReader`` does (``ReaderTensor.data``):
typed for F32/F16/F64 and the integer types, else the raw bytes as (..., bytes per row) uint8,
which ``gguf.quants.dequantize`` and ``models.quant.read_q4_blocks`` take. The ``gguf`` package
still supplies the type tables and the dequantization.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # of the tensor data, unless ``general.alignment`` says otherwise

# GGUF metadata value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# tensor types whose data is a plain numpy array (the rest are blocks of bytes)
_NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                GGMLQuantizationType.I64: np.int64}


@dataclass
class GGUFTensor:
    """One tensor's index entry and a view of its data in the memory map.

    ``shape`` is ggml's (innermost first, as ``ReaderTensor.shape``); ``data`` is numpy's order
    (outermost first), typed or (..., bytes per row) uint8 as described in the module docstring.
    """

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """The metadata (``fields``: key -> Python value; arrays as lists) and the tensors of a
    GGUF file, in file order.

    Raises:
        ValueError: not a GGUF file, an unsupported version or value type, a duplicate tensor
            name, or a file that ends inside its header or its data.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            # a plain ndarray over the map: np.memmap's subclass hooks cost ~0.2 s in gguf's
            # block-wise dequantization of a large Q8_0 tensor
            self._map = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                      dtype=np.uint8)
        self._buf = memoryview(self._map)  # struct reads; numpy views come from self._map
        self._pos = 0
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self._read("<Q"), self._read("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        index = [self._tensor_index() for _ in range(n_tensors)]
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(data_start, *entry) for entry in index]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError(f"{self.path.name} names a tensor twice")

    def _read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ValueError(f"{self.path.name} ends inside its header")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError(f"{self.path.name} ends inside its header")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, n = self._read("<I"), self._read("<Q")
            if etype in _SCALARS:  # one unpack for the whole array
                fmt = f"<{n}{_SCALARS[etype][1:]}"
                size = struct.calcsize(fmt)
                if self._pos + size > len(self._buf):
                    raise ValueError(f"{self.path.name} ends inside its header")
                values = list(struct.unpack_from(fmt, self._buf, self._pos))
                self._pos += size
                return values
            return [self._value(etype) for _ in range(n)]
        raise ValueError(f"{self.path.name}: unknown GGUF value type {vtype}")

    def _tensor_index(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._read("<I")
        shape = tuple(self._read("<Q") for _ in range(n_dims))
        return name, shape, self._read("<I"), self._read("<Q")

    def _tensor(self, data_start: int, name: str, shape: tuple[int, ...], raw_type: int,
                offset: int) -> GGUFTensor:
        ttype = GGMLQuantizationType(raw_type)
        n_elements = int(np.prod(shape))
        block_size, type_size = GGML_QUANT_SIZES[ttype]
        start = data_start + offset
        end = start + n_elements * type_size // block_size
        if end > len(self._map):
            raise ValueError(f"{self.path.name} ends inside tensor {name}")
        np_shape = tuple(reversed(shape))
        raw = self._map[start:end]
        if ttype in _NUMPY_TYPES:
            data = raw.view(_NUMPY_TYPES[ttype]).reshape(np_shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(np_shape, ttype))
        return GGUFTensor(name, ttype, shape, data)
