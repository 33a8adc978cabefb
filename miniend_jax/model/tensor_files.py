"""Readers of the weight files Hugging Face repositories publish, behind one interface.

A reader holds `tensors` ({name: TensorInfo(dtype, shape)}) and reads any box
of a tensor (`read(name, box)`), so the sliced loader (`sliced_read.py`) reads
only what a host's devices hold, whatever the format:

- `SafetensorsFile`: the JSON header, then byte ranges of whole rows through
  etils.epath (local or gs://), without mapping the file.
- `TorchBinFile`: `pytorch_model.bin` read by `torch.load(weights_only=True,
  mmap=True)`: torch's restricted unpickler builds tensors and plain
  containers only, never calls what a pickle names, and anything but tensors
  is refused. Needs torch (imported only here).
- `FlaxMsgpackFile`: `flax_model.msgpack` (Hugging Face Flax naming), decoded
  by flax's msgpack reader; the whole file is read once.

`weight_files(directory)` picks the best format a directory holds (safetensors,
then Flax msgpack, then PyTorch .bin; single files or shards with their index)
and says in one line what it holds when none is there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
from typing import Iterable

import ml_dtypes
import numpy as np
from etils import epath

from miniend_jax.model.layouts import Box


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as a T5 model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Format:
  """A published weight format: its single file, its shard pattern and its index."""

  name: str
  single: str
  shard_pattern: str  # a regular expression over file names
  index: str


FORMATS = (
    Format("safetensors", "model.safetensors", r"model-\d+-of-\d+\.safetensors",
           "model.safetensors.index.json"),
    Format("flax", "flax_model.msgpack", r"flax_model-\d+-of-\d+\.msgpack",
           "flax_model.msgpack.index.json"),
    Format("pytorch", "pytorch_model.bin", r"pytorch_model-\d+-of-\d+\.bin",
           "pytorch_model.bin.index.json"),
)
READABLE = ("model.safetensors (or shards with model.safetensors.index.json), "
            "flax_model.msgpack (or shards with its .index.json), pytorch_model.bin (or shards "
            "with its .index.json) beside config.json, or a T5X checkpoint (a `checkpoint` "
            "file beside target.* arrays)")


def format_files(fmt: Format, names: Iterable[str]) -> list[str]:
  """The files of `fmt` among `names` (index and shards, or the single file)."""
  names = set(names)
  if fmt.index in names:
    return [fmt.index] + sorted(n for n in names if re.fullmatch(fmt.shard_pattern, n))
  return [fmt.single] if fmt.single in names else []


def choose_format(names: Iterable[str]) -> Format | None:
  """The most preferred format present among file `names`."""
  names = list(names)
  return next((f for f in FORMATS if format_files(f, names)), None)


def describe(directory, names: Iterable[str]) -> str:
  """One sentence (no final period): what `directory` holds and which formats are read."""
  names = sorted(names)
  shown = ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "")
  return f"{directory} holds {shown or 'nothing'}; miniend_jax reads {READABLE}"


def weight_files(directory) -> tuple[Format, list[epath.Path]]:
  """(format, weight files) of the best format in `directory`, shards resolved
  through their index."""
  directory = epath.Path(directory)
  names = [p.name for p in directory.iterdir()]
  fmt = choose_format(names)
  if fmt is None:
    raise CheckpointError(f"No weights to read: {describe(directory, names)}.")
  if fmt.index not in names:
    return fmt, [directory / fmt.single]
  index = directory / fmt.index
  try:
    weight_map = json.loads(index.read_text()).get("weight_map")
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{index} is not valid JSON ({e}); download it again.") from e
  if not weight_map:
    raise CheckpointError(f"{index} has no 'weight_map'; the sharded checkpoint index is corrupt.")
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if f not in names]
  if missing:
    raise CheckpointError(f"{index} lists shards that are not in {directory}: {missing}. The "
                          "download is incomplete; fetch the missing files.")
  return fmt, [directory / f for f in files]


def open_files(fmt: Format, paths: list[epath.Path]) -> list["TensorFile"]:
  reader = {"safetensors": SafetensorsFile, "flax": FlaxMsgpackFile,
            "pytorch": TorchBinFile}[fmt.name]
  return [reader(p) for p in paths]


def split_rows(box: Box, row_bytes: int, piece_bytes: int) -> list[Box]:
  """`box` cut along its first axis into pieces of at most ~`piece_bytes`."""
  if not box:
    return [box]
  step = max(1, piece_bytes // max(row_bytes, 1))
  first = box[0]
  return [(slice(a, min(a + step, first.stop)),) + tuple(box[1:])
          for a in range(first.start, max(first.stop, first.start + 1), step)]


class TensorFile:
  """The reader interface: `tensors`, `read(name, box[, out])`, `pieces(name, box,
  bytes)`, `stored_bytes(name, box)`."""

  path: epath.Path
  tensors: dict[str, TensorInfo]

  def read(self, name: str, box: Box, out: np.ndarray | None = None) -> np.ndarray:
    """Box `box` of tensor `name` (written into `out`, of the box's shape, when given)."""
    data = self._read(name, box)
    if out is None:
      return data
    out[...] = data
    return out

  def _read(self, name: str, box: Box) -> np.ndarray:
    raise NotImplementedError

  def pieces(self, name: str, box: Box, piece_bytes: int) -> list[Box]:
    """`box` as sub-boxes to read in parallel (each read once, none overlapping)."""
    del name, piece_bytes
    return [box]

  def stored_bytes(self, name: str, box: Box) -> int:
    """Bytes a `read(name, box)` fetches from storage."""
    info = self.tensors[name]
    return int(np.prod([s.stop - s.start for s in box], dtype=np.int64)) * info.dtype.itemsize


# safetensors' own readers mmap whole local files (no gs://, and every touched
# page counts against the host's memory) and its numpy backend cannot name
# bfloat16. The format is a JSON header and raw little-endian arrays, so a
# reader of row ranges through etils.epath (local or gs://) is a few lines.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile(TensorFile):
  """Boxes of the tensors of one safetensors file, read as ranges of whole rows."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    try:
      with self.path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > 100_000_000:
          raise ValueError(f"header size {header_size} is implausible")
        header = json.loads(f.read(header_size))
      file_size = self.path.stat().length
    except Exception as e:  # pylint: disable=broad-except  (I/O, JSON, struct)
      raise CheckpointError(f"Cannot read safetensors file {self.path}: {e}. It is corrupt or "
                            "truncated; download it again.") from e
    header.pop("__metadata__", None)
    self._data_start = 8 + header_size
    self.tensors, self._offsets = {}, {}
    end = 0
    for name, info in header.items():
      if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which "
                              "miniend_jax cannot read.")
      self.tensors[name] = TensorInfo(np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]),
                                      tuple(info["shape"]))
      self._offsets[name] = info["data_offsets"][0]
      end = max(end, info["data_offsets"][1])
    if self._data_start + end > file_size:
      raise CheckpointError(f"Cannot read safetensors file {self.path}: it holds {file_size} "
                            f"bytes but its header describes {self._data_start + end}. It is "
                            "corrupt or truncated; download it again.")

  def _row_bytes(self, name: str) -> int:
    info = self.tensors[name]
    return int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize

  def read(self, name: str, box: Box, out: np.ndarray | None = None) -> np.ndarray:
    info = self.tensors[name]
    box = box if info.shape else ()
    start, stop = (box[0].start, box[0].stop) if box else (0, 1)
    whole_rows = all(s == slice(0, n) for s, n in zip(box[1:], info.shape[1:]))
    row_bytes = self._row_bytes(name)
    if out is None or not whole_rows or not out.flags.c_contiguous or out.dtype != info.dtype:
      target = np.empty(((stop - start),) + info.shape[1:] if box else (), info.dtype)
    else:
      target = out  # rows straight into the caller's buffer, no copy
    with self.path.open("rb") as f:
      f.seek(self._data_start + self._offsets[name] + start * row_bytes)
      got = _read_into(f, memoryview(target.reshape(-1).view(np.uint8)))
    if got != target.nbytes:
      raise CheckpointError(f"Cannot read tensor {name} of {self.path}: the file ends early. "
                            "It is corrupt or truncated; download it again.")
    if sys.byteorder == "big":  # safetensors stores little-endian
      target.byteswap(inplace=True)
    part = target if whole_rows else target[(slice(None),) + tuple(box[1:])]
    if out is None:
      return np.ascontiguousarray(part)  # frees the rows' other columns
    if part is not out:
      out[...] = part
    return out

  def pieces(self, name: str, box: Box, piece_bytes: int) -> list[Box]:
    return split_rows(box, self._row_bytes(name), piece_bytes)

  def stored_bytes(self, name: str, box: Box) -> int:
    rows = box[0].stop - box[0].start if box else 1
    return rows * (self._row_bytes(name) if box else self.tensors[name].dtype.itemsize)


def _read_into(f, buffer: memoryview) -> int:
  """Fills `buffer` from `f`'s position; returns the bytes read. Files of gs:// paths
  (tf.io.gfile's, through etils.epath) have no readinto: read, then copy."""
  if hasattr(f, "readinto"):
    return f.readinto(buffer)
  data = f.read(len(buffer))
  buffer[:len(data)] = data
  return len(data)


class TorchBinFile(TensorFile):
  """A `torch.save`d state dict (pytorch_model.bin), loaded without running pickled code."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise CheckpointError(
          f"{self.path} is PyTorch weights and reading them needs torch: `pip install torch` "
          "(the CPU build is enough), or pass a copy in safetensors or Flax msgpack format") from e
    self._torch = torch
    try:
      state = self._load()
    except Exception as e:  # pylint: disable=broad-except  (UnpicklingError, RuntimeError, OSError)
      first_line = (str(e).splitlines() or ["no details"])[0][:200]
      raise CheckpointError(
          f"Refusing {self.path}: torch.load(weights_only=True) cannot read it "
          f"({type(e).__name__}: {first_line}). It is damaged, or holds more than plain "
          "tensors (pickled code is never run); download it again or use a safetensors "
          "copy") from e
    others = (sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
              if isinstance(state, dict) else [type(state).__name__])
    if others:
      raise CheckpointError(
          f"Refusing {self.path}: it holds non-tensor entries ({others[:5]}), not a plain "
          "state dict of tensors. Use a safetensors copy of the weights")
    self._state = state
    self.tensors = {k: TensorInfo(_numpy_dtype(v.dtype), tuple(v.shape)) for k, v in state.items()}

  def _load(self):
    torch = self._torch
    if "://" in os.fspath(self.path):  # no mmap off the local disk: read it whole
      with self.path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)
    try:
      return torch.load(os.fspath(self.path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      # torch < 1.6's legacy format cannot be mapped; it is read whole, as safely.
      return torch.load(os.fspath(self.path), map_location="cpu", weights_only=True)

  def _read(self, name: str, box: Box) -> np.ndarray:
    tensor = self._state[name][box] if box else self._state[name]
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: keep the bits
      return tensor.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()

  def pieces(self, name: str, box: Box, piece_bytes: int) -> list[Box]:
    info = self.tensors[name]
    return split_rows(box, info.nbytes // max(info.shape[0], 1) if info.shape else 0, piece_bytes)


def _numpy_dtype(torch_dtype) -> np.dtype:
  name = str(torch_dtype).rsplit(".", 1)[-1]
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class FlaxMsgpackFile(TensorFile):
  """A Hugging Face Flax checkpoint file (flax_model.msgpack or one shard of it);
  tensor names are the parameter paths joined with '.'."""

  def __init__(self, path: epath.PathLike):
    from flax import serialization, traverse_util  # pylint: disable=import-outside-toplevel
    self.path = epath.Path(path)
    try:
      tree = serialization.msgpack_restore(self.path.read_bytes())
    except Exception as e:  # pylint: disable=broad-except  (msgpack's errors vary)
      raise CheckpointError(f"Cannot read Flax msgpack file {self.path}: {e}. It is corrupt or "
                            "truncated; download it again.") from e
    self._arrays = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep=".").items()}
    self.tensors = {k: TensorInfo(v.dtype, v.shape) for k, v in self._arrays.items()}

  def _read(self, name: str, box: Box) -> np.ndarray:
    return self._arrays[name][box] if box else self._arrays[name]
