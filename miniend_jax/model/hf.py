"""Import and export Hugging Face T5 checkpoints without torch.

`load_hf` reads a directory (or downloads a hub id) holding `config.json` and
`model.safetensors` or sharded safetensors with `model.safetensors.index.json`
(how 3B and 11B checkpoints ship). `save_hf` writes a directory that
`transformers.T5ForConditionalGeneration.from_pretrained` loads and that gives
the same logits as our Flax `T5`.

Weight layout: torch `nn.Linear` stores [out, in]; our kernels are [in, ...out]
with the attention heads split out ([d_model, heads, d_kv]), as t5x does.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from miniend_jax.model.t5 import T5Config, param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be read as a T5 model."""


# ----------------------------------------------------------------------------
# Config.


# model_types read; umT5 differs from T5 only in its per-layer relative-position tables.
MODEL_TYPES = ("t5", "mt5", "umt5")


def check_model_type(hf_config: Mapping[str, Any]) -> None:
  """Raises CheckpointError unless config.json describes a T5 model."""
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise CheckpointError(
        f"config.json describes model_type={model_type!r}, not a T5 encoder-decoder; "
        "miniend_jax reads T5, T5 v1.1, Flan-T5, mT5, umT5, ByT5 and UL2 checkpoints "
        f"(model_type one of {MODEL_TYPES}).")


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> T5Config:
  """Builds a `T5Config` from a Hugging Face `config.json` dict.

  transformers 5 always writes `tie_word_embeddings: true` for T5 and records the
  v1.0 output rescaling in `scale_decoder_outputs`; older versions record both
  in `tie_word_embeddings`; mT5's head is never rescaled. Our `tie_word_embeddings` means "v1.0 head": tied and
  rescaled by d_model**-0.5.
  """
  check_model_type(hf_config)
  scaled_head = hf_config.get("scale_decoder_outputs",
                              hf_config.get("tie_word_embeddings", True))
  if hf_config.get("model_type") == "mt5":
    # mT5 never rescales (its weights are untied); transformers 5 writes
    # tie_word_embeddings: true for it all the same.
    scaled_head = False
  fields = dict(
      vocab_size=hf_config["vocab_size"],
      d_model=hf_config["d_model"],
      d_kv=hf_config["d_kv"],
      d_ff=hf_config["d_ff"],
      num_layers=hf_config["num_layers"],
      num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
      num_heads=hf_config["num_heads"],
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      feed_forward_proj=hf_config.get("feed_forward_proj", "relu"),
      tie_word_embeddings=bool(scaled_head),
      dropout_rate=hf_config.get("dropout_rate", 0.1),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
      relative_bias_per_layer=hf_config.get("model_type") == "umt5",
  )
  fields.update(overrides)
  try:
    return T5Config(**fields)
  except ValueError as e:
    raise CheckpointError(f"config.json cannot be used: {e}") from e


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """The `config.json` dict transformers needs for `config` (umT5 when its
  relative-position tables are per layer, else T5)."""
  umt5 = config.relative_bias_per_layer
  return {
      "architectures": ["UMT5ForConditionalGeneration" if umt5 else "T5ForConditionalGeneration"],
      "model_type": "umt5" if umt5 else "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_layers": config.num_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "feed_forward_proj": config.feed_forward_proj,
      "tie_word_embeddings": config.tie_word_embeddings,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "is_encoder_decoder": True,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "dtype": str(jnp.dtype(config.param_dtype)),
  }


# ----------------------------------------------------------------------------
# Name mapping. Each entry: our param path, HF tensor name, and the layout kind:
#   same    identical layout
#   linear  torch nn.Linear [out, in]          -> ours [in, out]
#   qkv     torch [heads*d_kv, d_model]        -> ours [d_model, heads, d_kv]
#   out     torch [d_model, heads*d_kv]        -> ours [heads, d_kv, d_model]
# The kinds (not opaque lambdas) let the sharded reader map a block of our
# array back to the rows of the stored tensor it needs.


def _attention_entries(ours: str, theirs: str):
  for our_name, their_name in (("query", "q"), ("key", "k"), ("value", "v")):
    yield (f"{ours}/{our_name}/kernel", f"{theirs}.{their_name}.weight", "qkv")
  yield (f"{ours}/out/kernel", f"{theirs}.o.weight", "out")


def _mlp_entries(ours: str, theirs: str, cfg: T5Config):
  names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
  for name in names:
    yield (f"{ours}/{name}/kernel", f"{theirs}.{name}.weight", "linear")


def _name_map(cfg: T5Config):
  """(our path, HF name, layout kind) for every parameter of `cfg` (unscanned layout)."""
  yield ("shared/embedding", "shared.weight", "same")
  for i in range(cfg.num_layers):
    ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    yield (f"{ours}/pre_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", "same")
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
    if cfg.relative_bias_per_layer:
      yield (f"{ours}/relpos_bias/rel_embedding",
             f"{theirs}.0.SelfAttention.relative_attention_bias.weight", "linear")
    yield (f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.1.layer_norm.weight", "same")
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.1.DenseReluDense", cfg)
  if not cfg.relative_bias_per_layer:
    yield ("encoder/relpos_bias/rel_embedding",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "linear")
  yield ("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", "same")
  for i in range(cfg.num_decoder_layers):
    ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    yield (f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", "same")
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
    if cfg.relative_bias_per_layer:
      yield (f"{ours}/relpos_bias/rel_embedding",
             f"{theirs}.0.SelfAttention.relative_attention_bias.weight", "linear")
    yield (f"{ours}/pre_cross_attention_layer_norm/scale", f"{theirs}.1.layer_norm.weight",
           "same")
    yield from _attention_entries(f"{ours}/encoder_decoder_attention",
                                  f"{theirs}.1.EncDecAttention")
    yield (f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.2.layer_norm.weight", "same")
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.2.DenseReluDense", cfg)
  if not cfg.relative_bias_per_layer:
    yield ("decoder/relpos_bias/rel_embedding",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "linear")
  yield ("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", "same")
  if not cfg.tie_word_embeddings:
    yield ("lm_head/kernel", "lm_head.weight", "linear")


def _hf_shape(kind: str, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The stored tensor's shape for one of our parameter shapes."""
  if kind == "same":
    return tuple(ours_shape)
  if kind == "linear":
    return tuple(reversed(ours_shape))
  if kind == "qkv":
    d_model, heads, d_kv = ours_shape
    return (heads * d_kv, d_model)
  heads, d_kv, d_model = ours_shape  # out
  return (d_model, heads * d_kv)


def _to_hf(kind: str, value: np.ndarray) -> np.ndarray:
  """Our parameter as the stored tensor."""
  if kind == "same":
    return value
  if kind == "linear":
    return value.T
  if kind == "qkv":
    return value.reshape(value.shape[0], -1).T
  return value.reshape(-1, value.shape[-1]).T  # out


def _row_axis(kind: str) -> tuple[int, int]:
  """(axis of our array that runs along the stored tensor's rows, stored rows per step of it)."""
  return {"same": (0, 1), "linear": (1, 1), "out": (2, 1)}.get(kind, (1, None))


def _block_rows(kind: str, ours_shape, index) -> tuple[int, int]:
  """The stored tensor's rows [start, stop) a block `index` of our array reads."""
  axis, per_row = _row_axis(kind)
  if kind == "qkv":
    per_row = ours_shape[2]  # rows are (head, d_kv) pairs
  start, stop, _ = index[axis].indices(ours_shape[axis])
  return start * per_row, stop * per_row


def _block_from_rows(kind: str, rows: np.ndarray, ours_shape, index) -> np.ndarray:
  """Block `index` of our array from the stored rows `_block_rows` named."""
  if kind == "same":
    return rows[(slice(None),) + tuple(index[1:])]
  if kind == "linear":
    return rows[:, index[0]].T
  if kind == "qkv":
    d_kv = ours_shape[2]
    return rows.reshape(-1, d_kv, rows.shape[-1])[:, index[2], index[0]].transpose(2, 0, 1)
  heads, d_kv = ours_shape[0], ours_shape[1]  # out
  return rows.reshape(rows.shape[0], heads, d_kv)[:, index[0], index[1]].transpose(1, 2, 0)


def _set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get_path(tree: Mapping, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------
# Reading.

# safetensors' own readers mmap whole local files (no gs://, and every touched
# page counts against the host's memory) and its numpy backend cannot name
# bfloat16. The format is a JSON header and raw little-endian arrays, so a
# reader of row ranges through etils.epath (local or gs://) is a few lines.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _resolve_directory(path_or_hub_id: str) -> str:
  """A local or gs:// (any etils.epath) directory as given, or a hub id's download."""
  path_or_hub_id = os.path.expanduser(path_or_hub_id)
  path = epath.Path(path_or_hub_id)
  if path.is_dir():
    return path_or_hub_id
  if "://" in path_or_hub_id or path.exists() or path_or_hub_id.startswith((".", "/", "~")):
    raise FileNotFoundError(
        f"{path_or_hub_id!r} is not a checkpoint directory. Pass a directory holding "
        "config.json and model.safetensors (or a Hugging Face hub id such as 'google/t5-v1_1-base').")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return huggingface_hub.snapshot_download(
        path_or_hub_id,
        allow_patterns=[CONFIG_NAME, "*.safetensors", WEIGHTS_INDEX_NAME, *TOKENIZER_FILES])
  except Exception as e:  # Network errors come in many types; all mean the same here.
    raise FileNotFoundError(
        f"Could not download Hugging Face checkpoint {path_or_hub_id!r} ({type(e).__name__}: {e}). "
        "Without network access, download it elsewhere (e.g. `huggingface-cli download "
        f"{path_or_hub_id} --local-dir DIR`) and pass the local directory instead.") from e


def _weight_files(directory: str) -> list[epath.Path]:
  directory = epath.Path(directory)
  index = directory / WEIGHTS_INDEX_NAME
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index} has no 'weight_map'; the sharded checkpoint index is corrupt.")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
      raise CheckpointError(
          f"{index} lists shards that are not in {directory}: {missing}. The download is "
          "incomplete; fetch the missing files.")
    return [directory / f for f in files]
  single = directory / WEIGHTS_NAME
  if single.exists():
    return [single]
  if any(f.name.endswith(".bin") for f in directory.iterdir()):
    raise CheckpointError(
        f"{directory} holds only PyTorch .bin weights. miniend_jax reads safetensors without "
        "torch; convert once with transformers (`T5ForConditionalGeneration.from_pretrained(d)"
        ".save_pretrained(d)` writes model.safetensors).")
  raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}.")


class SafetensorsFile:
  """Row ranges of the tensors of one safetensors file, read on demand."""

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
    self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    end = 0
    for name, info in header.items():
      if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which "
                              "miniend_jax cannot read.")
      begin, stop = info["data_offsets"]
      self.tensors[name] = (np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]),
                            begin)
      end = max(end, stop)
    if self._data_start + end > file_size:
      raise CheckpointError(f"Cannot read safetensors file {self.path}: it holds "
                            f"{file_size} bytes but its header describes "
                            f"{self._data_start + end}. It is corrupt or truncated; download "
                            "it again.")

  def read_rows(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of tensor `name` (all rows by default), as numpy."""
    dtype, shape, begin = self.tensors[name]
    if not shape:
      start, stop, row_elems = 0, 1, 1
    else:
      start = 0 if start is None else start
      stop = shape[0] if stop is None else stop
      row_elems = int(np.prod(shape[1:], dtype=np.int64))
    row_bytes = row_elems * dtype.itemsize
    with self.path.open("rb") as f:
      f.seek(self._data_start + begin + start * row_bytes)
      data = f.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
      raise CheckpointError(f"Cannot read tensor {name} of {self.path}: the file ends early. "
                            "It is corrupt or truncated; download it again.")
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    return array.reshape(((stop - start),) + tuple(shape[1:]) if shape else ())


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  """All tensors of the given safetensors files as numpy arrays (bf16 via ml_dtypes)."""
  tensors = {}
  for path in files:
    reader = SafetensorsFile(path)
    for name in reader.tensors:
      tensors[name] = reader.read_rows(name)
  return tensors


class HFCheckpoint:
  """A Hugging Face T5 checkpoint directory: its config and where each tensor lives."""

  def __init__(self, path_or_hub_id: str):
    self.directory = _resolve_directory(path_or_hub_id)
    self.hf_config = read_hf_config_dict(self.directory)
    check_model_type(self.hf_config)  # before looking for weights: say "not a T5" first
    self._aliases: dict[str, str] = {}
    self._files: dict[str, SafetensorsFile] = {}
    for path in _weight_files(self.directory):
      reader = SafetensorsFile(path)
      for name in reader.tensors:
        self._files[name] = reader
    if "shared.weight" not in self._files:
      for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if alias in self._files:
          self._aliases["shared.weight"] = alias
          break

  def _name(self, name: str) -> str:
    return self._aliases.get(name, name)

  def has(self, name: str) -> bool:
    return self._name(name) in self._files

  def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    dtype, shape, _ = self._files[self._name(name)].tensors[self._name(name)]
    return dtype, shape

  def read_rows(self, name: str, start=None, stop=None) -> np.ndarray:
    return self._files[self._name(name)].read_rows(self._name(name), start, stop)

  def config(self, **overrides) -> T5Config:
    """The T5Config of config.json; `param_dtype` defaults to the stored dtype."""
    stored = str(self.info("shared.weight")[0]) if self.has("shared.weight") else "float32"
    return config_from_hf(self.hf_config, **{"param_dtype": stored, **overrides})

  def entries(self, config: T5Config) -> list[tuple[str, str, str]]:
    """(our path, stored name, kind) for every parameter, checked against the stored
    shapes: a CheckpointError lists what is missing or misshapen."""
    if not config.tie_word_embeddings and not self.has("lm_head.weight"):
      # transformers 5 stores no lm_head when it equals the embedding, even for an
      # unscaled (v1.1-style) head.
      self._aliases["lm_head.weight"] = self._name("shared.weight")
    expected = param_shapes(_unscanned(config))
    problems, entries = [], []
    for ours, theirs, kind in _name_map(config):
      if not self.has(theirs):
        problems.append(f"missing {theirs}")
        continue
      want = _hf_shape(kind, _get_path(expected, ours).shape)
      stored = self.info(theirs)[1]
      if stored != want:
        problems.append(f"{theirs} has shape {stored}, config.json implies {want}")
        continue
      entries.append((ours, theirs, kind))
    if problems:
      shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more"
                                         if len(problems) > 8 else "")
      raise CheckpointError(
          f"{self.directory} does not match its config.json: {shown}. The checkpoint is "
          "incomplete or config.json belongs to another model.")
    if (config.tie_word_embeddings and "lm_head.weight" in self._files
        and self._name("lm_head.weight") != self._name("shared.weight")):
      # Compare a few rows: a separate head differs from the embedding at once.
      rows = min(8, self.info("shared.weight")[1][0])
      if not np.array_equal(self.read_rows("lm_head.weight", 0, rows),
                            self.read_rows("shared.weight", 0, rows)):
        raise CheckpointError(
            f"{self.directory}: config.json declares a tied, rescaled output head (T5 v1.0) "
            "but the checkpoint has a separate lm_head.weight. Set tie_word_embeddings=false "
            "in config.json if the head is untied (T5 v1.1).")
    return entries

  def read_block(self, theirs: str, kind: str, ours_shape, index, *,
                 chunk_bytes: int = 16 << 20) -> np.ndarray:
    """Block `index` (a tuple of slices of our array) of one parameter, reading only
    the stored rows it needs, at most `chunk_bytes` of them at a time (a block
    that is a column slice of a large tensor never holds the whole tensor)."""
    index = tuple(index) + (slice(None),) * (len(ours_shape) - len(index))
    axis, _ = _row_axis(kind)
    start, stop, _ = index[axis].indices(ours_shape[axis])
    one_start, one_stop = _block_rows(kind, ours_shape, _with(index, axis, slice(start, start + 1)))
    dtype, shape = self.info(theirs)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize * (one_stop - one_start)
    step = max(1, chunk_bytes // max(row_bytes, 1))
    pieces = []
    for a in range(start, stop, step):
      part = _with(index, axis, slice(a, min(a + step, stop)))
      rows_start, rows_stop = _block_rows(kind, ours_shape, part)
      # A copy, so the rows read (of which the piece may be a small view) are freed now.
      pieces.append(np.array(_block_from_rows(kind, self.read_rows(theirs, rows_start, rows_stop),
                                              ours_shape, part)))
    if not pieces:  # an empty block
      return _block_from_rows(kind, self.read_rows(theirs, 0, 0), ours_shape, index)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)


def _with(index: tuple, axis: int, part: slice) -> tuple:
  return index[:axis] + (part,) + index[axis + 1:]


def _unscanned(config: T5Config) -> T5Config:
  return config.replace(scan_layers=False) if getattr(config, "scan_layers", False) else config


def read_hf_config_dict(directory) -> dict:
  config_path = epath.Path(directory) / CONFIG_NAME
  if not config_path.exists():
    raise CheckpointError(f"{directory} has no config.json; it is not a Hugging Face checkpoint.")
  try:
    return json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e


def read_hf_config(path_or_hub_id: str, **overrides) -> T5Config:
  """The T5Config of a Hugging Face checkpoint, without reading its weights."""
  return config_from_hf(read_hf_config_dict(_resolve_directory(path_or_hub_id)), **overrides)


def load_hf(path_or_hub_id: str, *, param_dtype: str | None = None,
            **config_overrides) -> tuple[T5Config, dict]:
  """Reads a Hugging Face T5 checkpoint into host memory.

  Args:
    path_or_hub_id: a local or gs:// directory, or a hub id (downloaded through
      huggingface_hub when the network allows).
    param_dtype: cast the parameters to this dtype (default: keep the stored dtype,
      float32 for float32 checkpoints).
    **config_overrides: T5Config fields to override (e.g. dtype="bfloat16").

  Returns:
    (T5Config, params) where params is a nested dict of numpy arrays in our layout.
    For a model larger than one host, use `load_hf_sharded`.
  """
  checkpoint = HFCheckpoint(path_or_hub_id)
  overrides = dict(config_overrides)
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  config = checkpoint.config(**overrides)
  dtype = jnp.dtype(config.param_dtype)
  expected = param_shapes(_unscanned(config))
  params: dict = {}
  for ours, theirs, kind in checkpoint.entries(config):
    shape = _get_path(expected, ours).shape
    block = checkpoint.read_block(theirs, kind, shape, ())
    _set_path(params, ours, np.asarray(block, dtype=dtype))
  return config, _maybe_stack(config, params)


def load_hf_sharded(path_or_hub_id: str, shardings, *, config: T5Config | None = None,
                    **config_overrides) -> tuple[T5Config, dict]:
  """Reads a Hugging Face T5 checkpoint straight into sharded jax.Arrays.

  Each process reads only the rows of each stored tensor its own devices'
  shards need (`jax.make_array_from_callback`), casts them to the config's
  `param_dtype` on the way and keeps nothing else: no process ever holds the
  whole model, no float32 copy stays behind, no tensor passes through one
  device.

  Args:
    path_or_hub_id: a local or gs:// directory, or a hub id.
    shardings: a NamedSharding per parameter (e.g. `partitioning.logical_to_sharding(
      t5.param_logical_axes(config), mesh)`).
    config: the config to load as (its `param_dtype` is the stored dtype of the
      result); default: config.json with `config_overrides`.
  Returns:
    (T5Config, params) with params a nested dict of jax.Arrays in `shardings`.
  """
  checkpoint = HFCheckpoint(path_or_hub_id)
  config = config or checkpoint.config(**config_overrides)
  dtype = jnp.dtype(config.param_dtype)
  expected = param_shapes(_unscanned(config))
  entries = {ours: (theirs, kind) for ours, theirs, kind in checkpoint.entries(config)}

  def load(ours: str, sharding):
    theirs, kind = entries[ours]
    shape = _get_path(expected, ours).shape
    index_map = sharding.addressable_devices_indices_map(shape)
    key = lambda index: tuple(s.indices(n) for s, n in zip(index, shape))
    uses = collections.Counter(key(index) for index in index_map.values())
    blocks, arrays = {}, []
    # One device at a time, so a host never holds more than one block beside what
    # its devices already hold; replicas on this host share one read.
    for device, index in index_map.items():
      k = key(index)
      if k not in blocks:
        blocks[k] = np.asarray(checkpoint.read_block(theirs, kind, shape, index), dtype=dtype)
      arrays.append(jax.device_put(blocks[k], device))
      uses[k] -= 1
      if not uses[k]:
        del blocks[k]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  if getattr(config, "scan_layers", False):
    unstacked_shardings = _unstacked_shardings(shardings, config)
    params = {}
    for ours in entries:
      _set_path(params, ours, load(ours, _get_path(unstacked_shardings, ours)))
    return config, _maybe_stack(config, params, shardings)
  params = {}
  for ours in entries:
    _set_path(params, ours, load(ours, _get_path(shardings, ours)))
  return config, params


def _unstacked_shardings(shardings, config: T5Config):
  """The shardings of a scanned config's params as `layers_i` subtrees (each layer's
  leaf sharded like its stacked leaf without the leading layer axis)."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  out = dict(shardings)
  for stack, num_layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    sub = dict(shardings[stack])
    per_layer = jax.tree.map(lambda sh: NamedSharding(sh.mesh, PartitionSpec(*sh.spec[1:])),
                             sub.pop("layers"))
    sub.update({f"layers_{i}": per_layer for i in range(num_layers)})
    out[stack] = sub
  return out


def _maybe_stack(config: T5Config, params: dict, shardings=None) -> dict:
  """Our unscanned layout -> the config's layout (stacked layers when scanned)."""
  if not getattr(config, "scan_layers", False):
    return params
  from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel
  if shardings is None:
    return t5.stack_layer_params(params, config)
  return jax.jit(lambda p: t5.stack_layer_params(p, config), out_shardings=shardings,
                 donate_argnums=0)(params)


# ----------------------------------------------------------------------------
# Writing.


def save_hf(config: T5Config, params: Mapping, out_dir: str, *,
            tokenizer_from: str | None = None, max_shard_size: int | str = "5GB",
            dtype: str | None = None) -> str:
  """Writes `params` as a Hugging Face T5 checkpoint directory.

  Args:
    config: the model's config.
    params: parameters in our layout (numpy or jax arrays, possibly sharded).
    out_dir: created if missing.
    tokenizer_from: a directory whose tokenizer files (spiece.model, tokenizer.json,
      ...) are copied alongside, so the export is usable with AutoTokenizer.
    max_shard_size: shards above this size are split, with an index file.
    dtype: cast weights to this dtype (default: the parameters' dtype).

  Returns:
    out_dir.
  """
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if getattr(config, "scan_layers", False):
    from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel
    params = t5.unstack_layer_params(params, config)
    config = _unscanned(config)
  expected = param_shapes(config)
  tensors = {}
  for ours, theirs, kind in _name_map(config):
    try:
      value = np.asarray(jax.device_get(_get_path(params, ours)))
    except KeyError as e:
      raise ValueError(f"params lack {ours}; they do not belong to this config.") from e
    if value.shape != _get_path(expected, ours).shape:
      raise ValueError(f"params[{ours}] has shape {value.shape}, config implies "
                       f"{_get_path(expected, ours).shape}.")
    if dtype is not None:
      value = value.astype(dtype)
    tensors[theirs] = np.ascontiguousarray(_to_hf(kind, value))

  os.makedirs(out_dir, exist_ok=True)
  hf_config = config_to_hf(config)
  if dtype is not None:
    hf_config["dtype"] = dtype
  split = huggingface_hub.split_state_dict_into_shards_factory(
      tensors, get_storage_size=lambda t: t.nbytes, max_shard_size=max_shard_size,
      filename_pattern="model{suffix}.safetensors")
  # Write every shard under a temporary name first: a crash mid-export never leaves
  # a directory that looks complete.
  for filename, names in split.filename_to_tensors.items():
    tmp = os.path.join(out_dir, filename + ".tmp")
    save_file({n: tensors[n] for n in names}, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; give it the usual mode
    os.replace(tmp, os.path.join(out_dir, filename))
  if split.is_sharded:
    with open(os.path.join(out_dir, WEIGHTS_INDEX_NAME), "w") as f:
      json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer_from is not None:
    copy_tokenizer_files(tokenizer_from, out_dir)
  return out_dir


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files `src_dir` has into `out_dir` (local or gs://); returns
  their names."""
  copied = []
  for name in TOKENIZER_FILES:
    src = epath.Path(src_dir) / name
    if src.exists():
      src.copy(epath.Path(out_dir) / name, overwrite=True)
      copied.append(name)
  return copied
