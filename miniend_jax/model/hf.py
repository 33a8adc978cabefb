"""Hugging Face T5 checkpoints in every published format, and export, without torch.

`load_hf` reads a checkpoint into host memory, `load_hf_sharded` straight into
shardings (each host reading only what its devices hold, once). A checkpoint
is a directory (local or gs://) holding config.json and, in this order of
preference, safetensors (`model.safetensors`, or shards with their index),
Flax msgpack (`flax_model.msgpack`, Hugging Face Flax naming, or shards) or
PyTorch `pytorch_model.bin` (or shards; read with torch's weights-only loader,
so torch is needed for that format alone); a Hub id (`ID` or `ID@REVISION`,
`hub.py`, downloading one format); or a T5X checkpoint directory (`t5x.py`).
`save_hf` writes a directory (local or gs://) that
`transformers.T5ForConditionalGeneration.from_pretrained` loads and that gives
the same logits as our Flax `T5`.

Weight layouts (`layouts.py`): torch `nn.Linear` stores [out, in], Flax
[in, out]; our kernels are [in, ...out] with the attention heads split out
([d_model, heads, d_kv]), as t5x does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath

from miniend_jax.model import hub, sliced_read, stacking, t5x, tensor_files
from miniend_jax.model.layouts import (HEADS_COLS, HEADS_ROWS, JOINED_IN, JOINED_OUT, SAME,
                                       TRANSPOSE, Layout)
from miniend_jax.model.config import T5Config
from miniend_jax.model.tensor_files import CheckpointError  # noqa: F401  (raised to callers)

CONFIG_NAME = hub.CONFIG_NAME
WEIGHTS_NAME = tensor_files.FORMATS[0].single
WEIGHTS_INDEX_NAME = tensor_files.FORMATS[0].index
TOKENIZER_FILES = hub.TOKENIZER_FILES


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
# Names. Each entry: our param path, the torch tensor name and its layout.


def _attention_entries(ours: str, theirs: str):
  for our_name, their_name in (("query", "q"), ("key", "k"), ("value", "v")):
    yield (f"{ours}/{our_name}/kernel", f"{theirs}.{their_name}.weight", HEADS_ROWS)
  yield (f"{ours}/out/kernel", f"{theirs}.o.weight", HEADS_COLS)


def _mlp_entries(ours: str, theirs: str, cfg: T5Config):
  names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
  for name in names:
    yield (f"{ours}/{name}/kernel", f"{theirs}.{name}.weight", TRANSPOSE)


def _relpos_entry(ours: str, theirs: str):
  return (f"{ours}/relpos_bias/rel_embedding",
          f"{theirs}.0.SelfAttention.relative_attention_bias.weight", TRANSPOSE)


def name_map(cfg: T5Config):
  """(our path, torch name, layout) for every parameter of `cfg` (unscanned layout)."""
  yield ("shared/embedding", "shared.weight", SAME)
  for i in range(cfg.num_layers):
    ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    yield (f"{ours}/pre_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", SAME)
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
    if cfg.relative_bias_per_layer:
      yield _relpos_entry(ours, theirs)
    yield (f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.1.layer_norm.weight", SAME)
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.1.DenseReluDense", cfg)
  if not cfg.relative_bias_per_layer:
    yield _relpos_entry("encoder", "encoder.block.0.layer")
  yield ("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", SAME)
  for i in range(cfg.num_decoder_layers):
    ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    yield (f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", SAME)
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
    if cfg.relative_bias_per_layer:
      yield _relpos_entry(ours, theirs)
    yield (f"{ours}/pre_cross_attention_layer_norm/scale", f"{theirs}.1.layer_norm.weight", SAME)
    yield from _attention_entries(f"{ours}/encoder_decoder_attention",
                                  f"{theirs}.1.EncDecAttention")
    yield (f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.2.layer_norm.weight", SAME)
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.2.DenseReluDense", cfg)
  if not cfg.relative_bias_per_layer:
    yield _relpos_entry("decoder", "decoder.block.0.layer")
  yield ("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", SAME)
  if not cfg.tie_word_embeddings:
    yield ("lm_head/kernel", "lm_head.weight", TRANSPOSE)


def flax_name(torch_name: str, layout: Layout) -> tuple[str, Layout]:
  """Hugging Face Flax naming of a torch tensor: Dense kernels are [in, out]
  (`.kernel`), Embed tables `.embedding`, layer norms keep `.weight`."""
  stem = torch_name.rsplit(".", 1)[0]
  if stem == "shared" or stem.endswith("relative_attention_bias"):
    return f"{stem}.embedding", layout
  if layout == SAME:  # layer norms
    return torch_name, layout
  return f"{stem}.kernel", {HEADS_ROWS: JOINED_IN, HEADS_COLS: JOINED_OUT, TRANSPOSE: SAME}[layout]


def _get_path(tree: Mapping, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _unscanned(config: T5Config) -> T5Config:
  return config.replace(scan_layers=False) if getattr(config, "scan_layers", False) else config


# ----------------------------------------------------------------------------
# Reading.


class HFCheckpoint:
  """A Hugging Face T5 checkpoint directory: its config and where each tensor lives,
  in whichever format it holds."""

  def __init__(self, path_or_hub_id: str):
    self.source = path_or_hub_id
    self.directory = hub.resolve(path_or_hub_id)
    self.hf_config = read_hf_config_dict(self.directory)
    check_model_type(self.hf_config)  # before looking for weights: say "not a T5" first
    self.format, paths = tensor_files.weight_files(self.directory)
    self._aliases: dict[str, str] = {}
    self._files: dict[str, tensor_files.TensorFile] = {}
    for reader in tensor_files.open_files(self.format, paths):
      for name in reader.tensors:
        self._files[name] = reader
    shared = self._stored("shared.weight", SAME)[0]
    if shared not in self._files:
      for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        alias = self._stored(alias, SAME)[0]
        if alias in self._files:
          self._aliases[shared] = alias
          break

  def _stored(self, torch_name: str, layout: Layout) -> tuple[str, Layout]:
    if self.format.name == "flax":
      return flax_name(torch_name, layout)
    return torch_name, layout

  def _name(self, name: str) -> str:
    return self._aliases.get(name, name)

  def has(self, name: str) -> bool:
    return self._name(name) in self._files

  def info(self, name: str) -> tensor_files.TensorInfo:
    return self._files[self._name(name)].tensors[self._name(name)]

  def read(self, name: str, box=()) -> np.ndarray:
    return self._files[self._name(name)].read(self._name(name), box)

  def config(self, **overrides) -> T5Config:
    """The T5Config of config.json; `param_dtype` defaults to the stored dtype."""
    shared = self._stored("shared.weight", SAME)[0]
    stored = str(self.info(shared).dtype) if self.has(shared) else "float32"
    return config_from_hf(self.hf_config, **{"param_dtype": stored, **overrides})

  def entries(self, config: T5Config) -> dict[str, sliced_read.Entry]:
    """{our path: Entry} for every parameter (unscanned paths), checked against the
    stored shapes: a CheckpointError lists what is missing or misshapen."""
    head, shared = self._stored("lm_head.weight", TRANSPOSE)[0], self._stored("shared.weight",
                                                                             SAME)[0]
    if not config.tie_word_embeddings and not self.has(head):
      # transformers 5 stores no lm_head when it equals the embedding, even for an
      # unscaled (v1.1-style) head.
      self._aliases[head] = self._name(shared)
    expected = sliced_read.flat_shapes(config)
    problems, entries = [], {}
    for ours, torch_name, layout in name_map(config):
      theirs, layout = self._stored(torch_name, layout)
      if self.format.name == "flax" and theirs == head and self._name(head) != head:
        layout = TRANSPOSE  # the embedding [vocab, d_model] standing in for a [d_model, vocab] head
      if not self.has(theirs):
        problems.append(f"missing {theirs}")
        continue
      want = layout.stored_shape(expected[ours])
      stored = self.info(theirs).shape
      if stored != want:
        problems.append(f"{theirs} has shape {stored}, config.json implies {want}")
        continue
      entries[ours] = sliced_read.Entry(self._files[self._name(theirs)], self._name(theirs),
                                        layout)
    if problems:
      shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more"
                                         if len(problems) > 8 else "")
      raise CheckpointError(
          f"{self.directory} does not match its config.json: {shown}. The checkpoint is "
          "incomplete or config.json belongs to another model.")
    if (config.tie_word_embeddings and self.has(head)
        and self._name(head) != self._name(shared)):
      # Compare a few rows: a separate head differs from the embedding at once.
      rows = min(8, self.info(shared).shape[0])
      head_rows = self.read(head, (slice(0, rows),) if self.format.name != "flax"
                            else (slice(None), slice(0, rows)))
      if self.format.name == "flax":
        head_rows = head_rows.T
      if not np.array_equal(head_rows, self.read(shared, (slice(0, rows),))):
        raise CheckpointError(
            f"{self.directory}: config.json declares a tied, rescaled output head (T5 v1.0) "
            "but the checkpoint has a separate lm_head.weight. Set tie_word_embeddings=false "
            "in config.json if the head is untied (T5 v1.1).")
    return entries


def open_checkpoint(source, **overrides) -> tuple[Any, T5Config]:
  """(checkpoint, its T5Config) for any checkpoint `source` names: a T5X checkpoint
  directory, or a Hugging Face directory / hub id in any published format. The
  checkpoint has `directory` and `entries(config)`; an opened one is taken as it is."""
  if isinstance(source, (HFCheckpoint, t5x.T5XCheckpoint)):
    checkpoint = source
  else:
    checkpoint = _t5x_checkpoint(source) or HFCheckpoint(os.path.expanduser(source))
  return checkpoint, checkpoint.config(**overrides)


def _t5x_checkpoint(source: str) -> t5x.T5XCheckpoint | None:
  """The T5X checkpoint at `source`, or None when it is not one (hub ids never are)."""
  source = os.path.expanduser(source)
  if hub.parse(source) is None or epath.Path(source).exists():
    if t5x.step_directory(source) is not None:
      return t5x.T5XCheckpoint(source)
  return None


def read_hf_config_dict(directory) -> dict:
  config_path = epath.Path(directory) / CONFIG_NAME
  if not config_path.exists():
    names = [p.name for p in epath.Path(directory).iterdir()]
    raise CheckpointError(f"{directory} has no config.json, so it is not a Hugging Face "
                          f"checkpoint: {tensor_files.describe(directory, names)}.")
  try:
    return json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e


def read_hf_config(path_or_hub_id: str, **overrides) -> T5Config:
  """The T5Config of a checkpoint (Hugging Face or T5X), without reading its weights
  (of a hub id, only config.json is downloaded)."""
  checkpoint = _t5x_checkpoint(path_or_hub_id)
  if checkpoint is not None:
    return checkpoint.config(**overrides)
  directory = hub.resolve(path_or_hub_id, weights=False)
  return config_from_hf(read_hf_config_dict(directory), **overrides)


def load_hf(path_or_hub_id: str, *, param_dtype: str | None = None,
            **config_overrides) -> tuple[T5Config, dict]:
  """Reads a T5 checkpoint (any format `open_checkpoint` reads) into host memory.

  Args:
    path_or_hub_id: a local or gs:// directory (Hugging Face or T5X), or a hub id
      (`ID` or `ID@REVISION`, downloaded through huggingface_hub when the network
      allows).
    param_dtype: cast the parameters to this dtype (default: keep the stored dtype,
      float32 for float32 checkpoints).
    **config_overrides: T5Config fields to override (e.g. dtype="bfloat16").

  Returns:
    (T5Config, params) where params is a nested dict of numpy arrays in our layout.
    For a model larger than one host, use `load_hf_sharded`.
  """
  overrides = dict(config_overrides)
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  checkpoint, config = open_checkpoint(path_or_hub_id, **overrides)
  flat = sliced_read.read_host(checkpoint.entries(config), sliced_read.flat_shapes(config),
                               jnp.dtype(config.param_dtype))
  params: dict = {}
  for path, value in flat.items():
    _set_path(params, path, value)
  if getattr(config, "scan_layers", False):
    from miniend_jax.model.params import stack_layer_params  # pylint: disable=import-outside-toplevel
    params = stack_layer_params(params, config)
  return config, params


def load_hf_sharded(path_or_hub_id: str, shardings, *, config: T5Config | None = None,
                    stats: sliced_read.ReadStats | None = None,
                    **config_overrides) -> tuple[T5Config, dict]:
  """Reads a T5 checkpoint (any format `open_checkpoint` reads) straight into sharded
  jax.Arrays.

  Each process reads, once, the part of each stored tensor its own devices'
  shards need (`sliced_read.read_sharded`), casts it to the config's
  `param_dtype` on the way and keeps nothing else: no process ever holds the
  whole model, no float32 copy stays behind, no tensor passes through one
  device. A scanned config's layers are read one by one into the per-layer
  shardings and stacked on the devices.

  Args:
    path_or_hub_id: a local or gs:// directory, a hub id, or a checkpoint
      `open_checkpoint` opened.
    shardings: a NamedSharding per parameter (e.g. `partitioning.logical_to_sharding(
      model.params.param_logical_axes(config), mesh)`).
    config: the config to load as (its `param_dtype` is the stored dtype of the
      result); default: the checkpoint's, with `config_overrides`.
    stats: receives what this host read (`sliced_read.ReadStats`).
  Returns:
    (T5Config, params) with params a nested dict of jax.Arrays in `shardings`.
  """
  checkpoint, own = open_checkpoint(path_or_hub_id, **config_overrides)
  config = config or own
  scanned = bool(getattr(config, "scan_layers", False))
  flat_shardings = shardings
  if scanned:
    flat_shardings = stacking.unrolled_shardings(
        shardings, {"encoder": config.num_layers, "decoder": config.num_decoder_layers})
  flat_shardings = {path: _get_path(flat_shardings, path) for path in sliced_read.flat_shapes(config)}
  flat = sliced_read.read_sharded(checkpoint.entries(config), sliced_read.flat_shapes(config),
                                  flat_shardings, jnp.dtype(config.param_dtype), stats=stats)
  params: dict = {}
  for path, value in flat.items():
    _set_path(params, path, value)
  return config, stacking.relayout(params, scanned, shardings if scanned else None)


# ----------------------------------------------------------------------------
# Writing.


def save_hf(config: T5Config, params: Mapping, out_dir: str, *,
            tokenizer_from: str | None = None, max_shard_size: int | str = "5GB",
            dtype: str | None = None) -> str:
  """Writes `params` as a Hugging Face T5 checkpoint directory (safetensors).

  Args:
    config: the model's config.
    params: parameters in our layout (numpy or jax arrays, possibly sharded).
    out_dir: a local or gs:// (any etils.epath) directory, created if missing.
    tokenizer_from: a directory whose tokenizer files (spiece.model, tokenizer.json,
      ...) are copied alongside, so the export is usable with AutoTokenizer.
    max_shard_size: shards above this size are split, with an index file.
    dtype: cast weights to this dtype (default: the parameters' dtype).

  Returns:
    out_dir.
  """
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

  if getattr(config, "scan_layers", False):
    from miniend_jax.model.params import unstack_layer_params  # pylint: disable=import-outside-toplevel
    params = unstack_layer_params(params, config)
    config = _unscanned(config)
  expected = sliced_read.flat_shapes(config)
  tensors = {}
  for ours, theirs, layout in name_map(config):
    try:
      value = np.asarray(jax.device_get(_get_path(params, ours)))
    except KeyError as e:
      raise ValueError(f"params lack {ours}; they do not belong to this config.") from e
    if value.shape != expected[ours]:
      raise ValueError(f"params[{ours}] has shape {value.shape}, config implies "
                       f"{expected[ours]}.")
    if dtype is not None:
      value = value.astype(dtype)
    tensors[theirs] = np.ascontiguousarray(layout.to_stored(value))

  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(config)
  if dtype is not None:
    hf_config["dtype"] = dtype
  split = huggingface_hub.split_state_dict_into_shards_factory(
      tensors, get_storage_size=lambda t: t.nbytes, max_shard_size=max_shard_size,
      filename_pattern="model{suffix}.safetensors")
  # Every shard is written under a temporary name, then renamed, and config.json
  # comes last: a crash mid-export never leaves a directory that looks complete.
  for filename, names in split.filename_to_tensors.items():
    tmp = out / (filename + ".tmp")
    tmp.write_bytes(save({n: tensors[n] for n in names}, metadata={"format": "pt"}))
    tmp.rename(out / filename)
  if split.is_sharded:
    (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(
        {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
  (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
  if tokenizer_from is not None:
    copy_tokenizer_files(tokenizer_from, out_dir)
  return out_dir


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
