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

import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

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


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> T5Config:
  """Builds a `T5Config` from a Hugging Face `config.json` dict.

  transformers 5 always writes `tie_word_embeddings: true` for T5 and records the
  v1.0 output rescaling in `scale_decoder_outputs`; older versions record both
  in `tie_word_embeddings`. Our `tie_word_embeddings` means "v1.0 head": tied and
  rescaled by d_model**-0.5.
  """
  model_type = hf_config.get("model_type")
  if model_type not in ("t5", "mt5"):
    raise CheckpointError(
        f"config.json describes model_type={model_type!r}, not a T5 encoder-decoder; "
        "miniend_jax reads T5 / T5 v1.1 / mT5 checkpoints (model_type 't5' or 'mt5').")
  scaled_head = hf_config.get("scale_decoder_outputs",
                              hf_config.get("tie_word_embeddings", True))
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
  )
  fields.update(overrides)
  try:
    return T5Config(**fields)
  except ValueError as e:
    raise CheckpointError(f"config.json cannot be used: {e}") from e


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """The `config.json` dict transformers needs for `config`."""
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
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
# Name mapping. Each entry: our param path, HF tensor name, and how to reshape.


def _attention_entries(ours: str, theirs: str, cfg: T5Config):
  heads = (cfg.num_heads, cfg.d_kv)
  for our_name, their_name in (("query", "q"), ("key", "k"), ("value", "v")):
    # torch [heads*d_kv, d_model] -> ours [d_model, heads, d_kv]
    yield (f"{ours}/{our_name}/kernel", f"{theirs}.{their_name}.weight",
           lambda w: w.T.reshape((cfg.d_model,) + heads),
           lambda k: k.reshape(cfg.d_model, -1).T)
  # torch [d_model, heads*d_kv] -> ours [heads, d_kv, d_model]
  yield (f"{ours}/out/kernel", f"{theirs}.o.weight",
         lambda w: w.T.reshape(heads + (cfg.d_model,)),
         lambda k: k.reshape(-1, cfg.d_model).T)


def _linear(ours: str, theirs: str):
  return (ours, theirs, lambda w: w.T, lambda k: k.T)


def _same(ours: str, theirs: str):
  return (ours, theirs, lambda w: w, lambda k: k)


def _mlp_entries(ours: str, theirs: str, cfg: T5Config):
  names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
  for name in names:
    yield _linear(f"{ours}/{name}/kernel", f"{theirs}.{name}.weight")


def _name_map(cfg: T5Config):
  """(our path, HF name, hf->ours, ours->hf) for every parameter of `cfg`."""
  yield _same("shared/embedding", "shared.weight")
  for i in range(cfg.num_layers):
    ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    yield _same(f"{ours}/pre_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight")
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention", cfg)
    yield _same(f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.1.layer_norm.weight")
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.1.DenseReluDense", cfg)
  yield _linear("encoder/relpos_bias/rel_embedding",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
  yield _same("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight")
  for i in range(cfg.num_decoder_layers):
    ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    yield _same(f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight")
    yield from _attention_entries(f"{ours}/self_attention", f"{theirs}.0.SelfAttention", cfg)
    yield _same(f"{ours}/pre_cross_attention_layer_norm/scale", f"{theirs}.1.layer_norm.weight")
    yield from _attention_entries(f"{ours}/encoder_decoder_attention",
                                  f"{theirs}.1.EncDecAttention", cfg)
    yield _same(f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.2.layer_norm.weight")
    yield from _mlp_entries(f"{ours}/mlp", f"{theirs}.2.DenseReluDense", cfg)
  yield _linear("decoder/relpos_bias/rel_embedding",
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
  yield _same("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight")
  if not cfg.tie_word_embeddings:
    yield _linear("lm_head/kernel", "lm_head.weight")


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


def _resolve_directory(path_or_hub_id: str) -> str:
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/", "~")):
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


def _weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, WEIGHTS_INDEX_NAME)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index} has no 'weight_map'; the sharded checkpoint index is corrupt.")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(
          f"{index} lists shards that are not in {directory}: {missing}. The download is "
          "incomplete; fetch the missing files.")
    return [os.path.join(directory, f) for f in files]
  single = os.path.join(directory, WEIGHTS_NAME)
  if os.path.exists(single):
    return [single]
  if any(f.endswith(".bin") for f in os.listdir(directory)):
    raise CheckpointError(
        f"{directory} holds only PyTorch .bin weights. miniend_jax reads safetensors without "
        "torch; convert once with transformers (`T5ForConditionalGeneration.from_pretrained(d)"
        ".save_pretrained(d)` writes model.safetensors).")
  raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}.")


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  """All tensors of the given safetensors files as numpy arrays (bf16 via ml_dtypes)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  tensors = {}
  for path in files:
    try:
      # The flax reader understands bfloat16, which plain numpy cannot name.
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name))
    except Exception as e:
      if isinstance(e, CheckpointError):
        raise
      raise CheckpointError(f"Cannot read safetensors file {path}: {e}. It is corrupt or "
                            "truncated; download it again.") from e
  return tensors


def load_hf(path_or_hub_id: str, *, param_dtype: str | None = None,
            **config_overrides) -> tuple[T5Config, dict]:
  """Reads a Hugging Face T5 checkpoint.

  Args:
    path_or_hub_id: a local directory, or a hub id (downloaded through
      huggingface_hub when the network allows).
    param_dtype: cast the parameters to this dtype (default: keep the stored dtype,
      float32 for float32 checkpoints).
    **config_overrides: T5Config fields to override (e.g. dtype="bfloat16").

  Returns:
    (T5Config, params) where params is a nested dict of numpy arrays in our layout.
  """
  directory = _resolve_directory(os.path.expanduser(path_or_hub_id))
  config_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(config_path):
    raise CheckpointError(f"{directory} has no config.json; it is not a Hugging Face checkpoint.")
  with open(config_path) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
  tensors = read_safetensors(_weight_files(directory))
  if "shared.weight" not in tensors:
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      if alias in tensors:
        tensors["shared.weight"] = tensors[alias]
        break

  stored_dtype = str(tensors["shared.weight"].dtype) if "shared.weight" in tensors else "float32"
  overrides = {"param_dtype": param_dtype or stored_dtype, **config_overrides}
  config = config_from_hf(hf_config, **overrides)
  if not config.tie_word_embeddings and "lm_head.weight" not in tensors:
    # transformers 5 stores no lm_head when it equals the embedding, even for an
    # unscaled (v1.1-style) head.
    tensors["lm_head.weight"] = tensors.get("shared.weight")
  if (config.tie_word_embeddings and "lm_head.weight" in tensors
      and "shared.weight" in tensors
      and not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])):
    raise CheckpointError(
        f"{directory}: config.json declares a tied, rescaled output head (T5 v1.0) but the "
        "checkpoint has a separate lm_head.weight. Set tie_word_embeddings=false in config.json "
        "if the head is untied (T5 v1.1).")

  expected = param_shapes(config)
  params: dict = {}
  problems = []
  for ours, theirs, to_ours, _ in _name_map(config):
    if theirs not in tensors:
      problems.append(f"missing {theirs}")
      continue
    want = _get_path(expected, ours).shape
    value = to_ours(tensors[theirs])
    if value.shape != want:
      problems.append(f"{theirs} has shape {tensors[theirs].shape}, config.json implies "
                      f"{tuple(reversed(want)) if value.ndim == 2 else want}")
      continue
    _set_path(params, ours, np.asarray(value, dtype=jnp.dtype(config.param_dtype)))
  if problems:
    shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
    raise CheckpointError(
        f"{directory} does not match its config.json: {shown}. The checkpoint is incomplete "
        "or config.json belongs to another model.")
  return config, params


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

  expected = param_shapes(config)
  tensors = {}
  for ours, theirs, _, to_hf in _name_map(config):
    try:
      value = np.asarray(jax.device_get(_get_path(params, ours)))
    except KeyError as e:
      raise ValueError(f"params lack {ours}; they do not belong to this config.") from e
    if value.shape != _get_path(expected, ours).shape:
      raise ValueError(f"params[{ours}] has shape {value.shape}, config implies "
                       f"{_get_path(expected, ours).shape}.")
    if dtype is not None:
      value = value.astype(dtype)
    tensors[theirs] = np.ascontiguousarray(to_hf(value))

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
    os.replace(tmp, os.path.join(out_dir, filename))
  if split.is_sharded:
    with open(os.path.join(out_dir, WEIGHTS_INDEX_NAME), "w") as f:
      json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer_from is not None:
    copy_tokenizer_files(tokenizer_from, out_dir)
  return out_dir


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files `src_dir` has into `out_dir`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    src = os.path.join(src_dir, name)
    if os.path.exists(src):
      shutil.copyfile(src, os.path.join(out_dir, name))
      copied.append(name)
  return copied
