"""Reading HF safetensors checkpoints (single file or sharded with an index) into numpy, tensor by tensor.

The header is parsed here rather than through `safetensors.safe_open(framework="numpy")` because
numpy has no bfloat16 or float8: those come back as `ml_dtypes` arrays. Each read copies one tensor
from the file into a fresh array (no memory map), so a reader streaming a large checkpoint holds only the
tensors it still uses. Headers are held to the `safetensors` library's rules (byte ranges of the right size
that tile the data section: no overlap, no gap, no trailing bytes). Every problem (missing shard, truncated
file, bad header, overlapping tensors) raises `CheckpointError` naming the file and, where it applies, the
tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or does not fit the model."""


def _check_entry(path: str, name: str, entry) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, and a byte range of exactly its size."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}")
    if entry.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but shape {shape} {entry['dtype']} needs {expected}"
        )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: str, entries: dict, data_size: int) -> None:
    """The byte ranges, in offset order, tile the data section exactly: each starts where the previous one
    ends, from 0 to the end of the file. This is what the `safetensors` library enforces (`Metadata::validate`
    plus the buffer-length check); without it two tensors could share bytes (one silently a copy of the other)
    or a file could carry bytes no tensor accounts for."""
    previous, position = None, 0
    for name, entry in sorted(entries.items(), key=lambda item: (*item[1]["data_offsets"], item[0])):
        begin, end = entry["data_offsets"]
        if begin < position:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap "
                f"(bytes {begin}..{min(end, position)} of the data section)"
            )
        if begin > position:
            after = f"after tensor {previous!r}" if previous else "at the start of the data section"
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, leaving a gap {after}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section"
            )
        previous, position = name, end
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor's data belong to no tensor")


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, dtypes, and memory-mapped reads."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{path}: truncated (no safetensors header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise CheckpointError(f"{path}: header length {header_len} is impossible for a {size}-byte file")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
        if not isinstance(header, dict):
            kind = type(header).__name__
            raise CheckpointError(f"{path}: corrupted safetensors header (a JSON {kind}, not an object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            _check_entry(path, name, entry)
        _check_layout(path, header, size - self._data_start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """The tensor, read from the file into a new numpy array."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        begin, end = self._entries[name]["data_offsets"]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        if raw.size != end - begin:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} could not be read in full")
        return raw.view(self.dtype(name)).reshape(self.shape(name))


class CheckpointReader:
    """All tensors of an HF checkpoint directory: `model.safetensors.index.json` or every *.safetensors."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            absent = sorted(s for s in set(weight_map.values()) if not os.path.exists(os.path.join(directory, s)))
            if absent:
                name = next(n for n, s in weight_map.items() if s == absent[0])
                shard_path = os.path.join(directory, absent[0])
                raise CheckpointError(f"{index_path}: points at missing shard {shard_path} (for tensor {name!r})")
            for name, shard in weight_map.items():
                file = self._open(shard)
                if name not in file._entries:
                    raise CheckpointError(f"{index_path}: tensor {name!r} is not in its shard {file.path}")
                self._where[name] = shard
        else:
            shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not shards:
                raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_NAME}")
            for shard in shards:
                for name in self._open(shard).keys():
                    if name in self._where:
                        raise CheckpointError(
                            f"{directory}: tensor {name!r} is in both {self._where[name]} and {shard}"
                        )
                    self._where[name] = shard

    def _open(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.directory, shard))
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def file_of(self, name: str) -> str:
        return self._files[self._where[name]].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._files[self._where[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        return self._files[self._where[name]].nbytes(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}")
        return self._files[self._where[name]].read(name)
