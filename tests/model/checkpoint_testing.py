"""One set of T5 weights written in every layout Google and Hugging Face publish.

From a transformers model's state dict (torch names, torch layouts) the tests
write, independently of the loaders they test:
- safetensors (`save_pretrained`) and PyTorch `pytorch_model.bin` (`torch.save`
  of the state dict), single or sharded with their index;
- Hugging Face Flax `flax_model.msgpack` (Flax naming: Dense kernels [in, out],
  Embed tables `.embedding`, layer norms `.weight`, nested dicts; sharded files
  and index keyed by "/"-joined paths, as `FlaxPreTrainedModel.save_pretrained`
  writes them);
- T5X checkpoints (`t5x_testing.write_t5x`) in t5x's naming.
Only the .bin writer needs torch.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import serialization, traverse_util

from tests.model import t5x_testing


def numpy_state(model) -> dict[str, np.ndarray]:
  """The model's state dict as numpy arrays (tied duplicates included)."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def tied_head(state: dict[str, np.ndarray]) -> bool:
  """Whether the output head is the embedding (T5 v1.0; transformers 5 marks every T5
  config tied, so the weights tell)."""
  return "lm_head.weight" not in state or np.array_equal(state["lm_head.weight"],
                                                          state["shared.weight"])


def _write_config(model, directory) -> None:
  os.makedirs(directory, exist_ok=True)
  model.config.to_json_file(os.path.join(directory, "config.json"))


def _shards(names: list[str], num_shards: int) -> list[list[str]]:
  return [list(part) for part in np.array_split(np.array(names, dtype=object), num_shards)]


def write_bin(model, directory, *, num_shards: int = 1) -> str:
  """pytorch_model.bin (or shards with pytorch_model.bin.index.json), torch.save'd."""
  import torch  # pylint: disable=import-outside-toplevel
  _write_config(model, directory)
  state = model.state_dict()
  if num_shards == 1:
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return directory
  weight_map = {}
  for i, names in enumerate(_shards(list(state), num_shards)):
    filename = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
    torch.save({n: state[n].clone() for n in names}, os.path.join(directory, filename))
    weight_map.update({n: filename for n in names})
  with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return directory


def flax_params(state: dict[str, np.ndarray], *, tied: bool) -> dict[str, np.ndarray]:
  """Hugging Face Flax T5 naming ("/"-joined) of a torch state dict."""
  out = {}
  for name, value in state.items():
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      continue  # Flax T5 keeps one shared table
    if name == "lm_head.weight" and tied:
      continue
    stem = name[:-len(".weight")].replace(".", "/")
    if stem == "shared" or stem.endswith("relative_attention_bias"):
      out[f"{stem}/embedding"] = value
    elif "layer_norm" in stem:
      out[f"{stem}/weight"] = value
    else:  # nn.Linear [out, in] -> nn.Dense kernel [in, out]
      out[f"{stem}/kernel"] = np.ascontiguousarray(value.T)
  return out


def write_msgpack(model, directory, *, num_shards: int = 1) -> str:
  """flax_model.msgpack (or shards with flax_model.msgpack.index.json)."""
  _write_config(model, directory)
  state = numpy_state(model)
  flat = flax_params(state, tied=tied_head(state))
  write = lambda path, part: open(path, "wb").write(serialization.msgpack_serialize(
      traverse_util.unflatten_dict(part, sep="/")))
  if num_shards == 1:
    write(os.path.join(directory, "flax_model.msgpack"), flat)
    return directory
  weight_map = {}
  for i, names in enumerate(_shards(sorted(flat), num_shards)):
    filename = f"flax_model-{i + 1:05d}-of-{num_shards:05d}.msgpack"
    write(os.path.join(directory, filename), {n: flat[n] for n in names})
    weight_map.update({n: filename for n in names})
  with open(os.path.join(directory, "flax_model.msgpack.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return directory


_T5X_LAYER = [  # (torch pattern after "<stack>.block.<i>.layer.", T5X name under the layer)
    (r"0\.layer_norm", {"encoder": "pre_attention_layer_norm",
                        "decoder": "pre_self_attention_layer_norm"}),
    (r"0\.SelfAttention\.(q|k|v|o)", {"encoder": "attention", "decoder": "self_attention"}),
    (r"1\.layer_norm", {"encoder": "pre_mlp_layer_norm", "decoder": "pre_cross_attention_layer_norm"}),
    (r"1\.EncDecAttention\.(q|k|v|o)", {"decoder": "encoder_decoder_attention"}),
    (r"2\.layer_norm", {"decoder": "pre_mlp_layer_norm"}),
]
_PROJECTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def t5x_params(state: dict[str, np.ndarray], *, tied: bool,
               scanned: bool = False) -> dict[str, np.ndarray]:
  """t5x's naming and layouts of a torch state dict (the inverse of transformers'
  T5X converters): kernels [in, out], attention kernels with heads joined (or,
  `scanned` as in t5x's scalable T5 / umT5, heads split and each stack's layers
  stacked along axis 1)."""
  layers: dict[str, dict[int, np.ndarray]] = {}
  out = {}
  num_heads = next(v.shape[1] for n, v in state.items() if "relative_attention_bias" in n)
  per_layer = any(re.search(r"block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative", n)
                  for n in state)  # umT5: a table in every layer
  for name, value in state.items():
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      continue
    if name == "shared.weight":
      out["token_embedder/embedding"] = value
    elif name == "lm_head.weight":
      if not tied:
        out["decoder/logits_dense/kernel"] = np.ascontiguousarray(value.T)
    elif m := re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name):
      out[f"{m[1]}/{m[1]}_norm/scale"] = value
    elif m := re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(.*)\.weight", name):
      stack, i, rest = m[1], int(m[2]), m[3]
      theirs, value = _t5x_layer_tensor(stack, rest, value, num_heads, scanned)
      if theirs.startswith("relpos_bias") and not per_layer:  # one table per stack
        out[f"{stack}/relpos_bias/rel_embedding"] = value
      elif scanned:
        layers.setdefault(f"{stack}/{stack}/{theirs}", {})[i] = value
      else:
        out[f"{stack}/layers_{i}/{theirs}"] = value
    else:
      raise ValueError(f"no T5X name for {name}")
  for theirs, by_layer in layers.items():
    out[theirs] = np.stack([by_layer[i] for i in sorted(by_layer)], axis=1)
  return out


def _t5x_layer_tensor(stack: str, rest: str, value: np.ndarray, num_heads: int, scanned: bool):
  if rest.endswith("relative_attention_bias"):
    return "relpos_bias/rel_embedding", np.ascontiguousarray(value.T)  # [heads, buckets]
  if m := re.fullmatch(r"[12]\.DenseReluDense\.(wi_0|wi_1|wi|wo)", rest):
    return f"mlp/{m[1]}/kernel", np.ascontiguousarray(value.T)
  for pattern, names in _T5X_LAYER:
    if m := re.fullmatch(pattern, rest):
      if "layer_norm" in pattern:
        return f"{names[stack]}/scale", value
      kernel = np.ascontiguousarray(value.T)  # q/k/v [D, H*K]; out [H*K, D]
      if scanned:
        kernel = (kernel.reshape(kernel.shape[0], num_heads, -1) if m[1] != "o"
                  else kernel.reshape(num_heads, -1, kernel.shape[1]))
      return f"{names[stack]}/{_PROJECTION[m[1]]}/kernel", kernel
  raise ValueError(f"no T5X name for {stack}.{rest}")


def write_t5x(model, directory, *, scanned: bool = False, step: int = 1000, **kwargs) -> str:
  """The model as a T5X checkpoint `directory/checkpoint_<step>` (see t5x_testing)."""
  state = numpy_state(model)
  target = t5x_params(state, tied=tied_head(state), scanned=scanned)
  return t5x_testing.write_t5x(directory, target, step=step, **kwargs)
