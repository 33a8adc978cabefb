"""T5X checkpoints as t5x writes them (e.g. gs://t5-data/pretrained_models/t5x/...), read
with tensorstore.

Layout, from t5x's `checkpoints.py` (`Checkpointer.save` / `restore`): a step
directory `checkpoint_<step>/` holds
  checkpoint        a msgpack (flax.serialization) of {"version": 3, "optimizer":
                    {"target": <params>, "state": <optimizer state>}}; each leaf is
                    the array itself (unpartitioned ones) or the JSON of a
                    tensorstore spec (partitioned ones: zarr, gzip chunks, a kvstore
                    path relative to the step directory, such as
                    "target.encoder.layers_0.attention.query.kernel"; older files
                    put that path at the spec's top level, and specs written on GCS
                    name the bucket "t5x-dummy-bucket", which the reader replaces)
  target.<path>/    the zarr array of each partitioned parameter
  state.*/          the optimizer's arrays (never read here)
Parameter names and layouts follow t5x's own models: `t5x/examples/t5` (T5,
T5 1.1, Flan-T5, mT5, ByT5; UL2's flaxformer checkpoints use the same names):
`token_embedder/embedding`, `{encoder,decoder}/layers_<i>/...` with attention
kernels [d_model, heads * d_kv] and outputs [heads * d_kv, d_model],
`{encoder,decoder}/relpos_bias/rel_embedding` [heads, buckets],
`decoder/logits_dense/kernel` when the head is untied; and
`t5x/examples/scalable_t5` (umT5): every layer of a stack scanned into
`encoder/encoder/...` with the layer axis second, heads split out, and a
relative-position table per layer.

Each host reads only the boxes its devices hold (`sliced_read`), through one
tensorstore context whose chunk cache lets the layers of a scanned tensor share
a chunk read. The model's shape comes from the stored shapes (heads from the
relative-position table); the activation, which shapes cannot tell, from the
preset of the same shapes (UL2: gated-SiLU), else gated-GELU or ReLU.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Mapping

import numpy as np
from etils import epath

from miniend_jax.model import presets, sliced_read
from miniend_jax.model.config import T5Config
from miniend_jax.model.layouts import JOINED_IN, JOINED_OUT, SAME, Box
from miniend_jax.model.tensor_files import CheckpointError, TensorFile, TensorInfo

CHECKPOINT_FILE = "checkpoint"
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
_DUMMY_BUCKET = "t5x-dummy-bucket"


# Google's published T5X checkpoints (t5x's docs/models.md; UL2's README):
# gs://t5-data/pretrained_models/t5x/<name>/checkpoint_<step> and UL2's bucket.
_PUBLISHED = re.compile(r"gs://t5-data/pretrained_models/t5x/(?P<name>[\w]+(/\w+)?)"
                        r"/checkpoint_\d+/?")
_PUBLISHED_UL2 = re.compile(r"gs://scenic-bucket/ul2/(ul220b/checkpoint_\d+|flan-ul220b-v3)/?")


def published_preset(path: str) -> str | None:
  """The preset of a checkpoint Google publishes in T5X form, from its path alone
  (e.g. .../t5x/t5_1_1_xxl/checkpoint_1000000 -> "t5-v1_1-xxl"), so a run can be
  planned without reading the bucket; None for other paths."""
  if _PUBLISHED_UL2.fullmatch(path):
    return "ul2"
  match = _PUBLISHED.fullmatch(path)
  if not match:
    return None
  name = match["name"].lower().replace("/", "-").replace("_", "-").replace("t5-1-1", "t5-v1_1")
  # The LM-adapted checkpoints have their base model's shapes.
  name = name.replace("-lm100k", "").replace("-lm-adapted", "")
  return name if name in presets.MODEL_PRESETS else None


def step_directory(path) -> epath.Path | None:
  """The T5X step directory `path` names (itself, or its newest `checkpoint_<step>`),
  or None when it is not a T5X checkpoint."""
  path = epath.Path(path)
  try:
    if (path / CHECKPOINT_FILE).is_file():
      return path
    steps = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / CHECKPOINT_FILE).is_file()]
  except (OSError, NotADirectoryError):
    return None
  return max(steps)[1] if steps else None


def _is_spec(value) -> bool:
  return isinstance(value, Mapping) and "driver" in value and ("kvstore" in value or "path" in value)


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{"a/b/c": leaf}, stopping at tensorstore specs (dicts themselves)."""
  if not isinstance(tree, Mapping) or _is_spec(tree):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def _kvstore(directory: str, relative: str) -> dict:
  """The tensorstore kvstore of `relative` (a zarr array) under the step `directory`."""
  relative = relative.strip("/") + "/"
  if directory.startswith("gs://"):
    bucket, _, prefix = directory[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": f"{prefix.rstrip('/')}/{relative}"}
  if "://" in directory:
    raise CheckpointError(f"{directory}: T5X checkpoints are read with tensorstore, from local "
                          "or gs:// directories; copy it to one of those")
  return {"driver": "file", "path": os.path.join(os.path.abspath(directory), relative)}


class T5XArrays(TensorFile):
  """The `target` parameters of one T5X step directory, as a `TensorFile`."""

  def __init__(self, directory, *, cache_bytes: int = 1 << 30):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    from flax import serialization  # pylint: disable=import-outside-toplevel
    self._ts = ts
    self.path = epath.Path(directory)
    try:
      contents = serialization.msgpack_restore((self.path / CHECKPOINT_FILE).read_bytes())
    except Exception as e:  # pylint: disable=broad-except  (I/O, msgpack)
      raise CheckpointError(f"Cannot read the T5X checkpoint file {self.path / CHECKPOINT_FILE}: "
                            f"{e}. It is corrupt or truncated; copy it again.") from e
    if "optimizer" in contents:
      if contents.get("version", 0) < 2:
        raise CheckpointError(f"{self.path}: T5X checkpoint version {contents.get('version', 0)}"
                              " predates the layout t5x reads (2 and later).")
      contents = contents["optimizer"]
    leaves = _flatten(contents.get("target", contents))
    self._inline, self._specs, self.tensors = {}, {}, {}
    for name, leaf in leaves.items():
      if _is_spec(leaf):
        spec = dict(leaf)
        shape = tuple(spec.get("metadata", {}).get("shape", ()))
        self._specs[name] = spec
        self.tensors[name] = TensorInfo(np.dtype(spec["dtype"]), shape)
      elif isinstance(leaf, np.ndarray):
        self._inline[name] = leaf
        self.tensors[name] = TensorInfo(leaf.dtype, leaf.shape)
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
    self._opened: dict[str, Any] = {}
    self._lock = threading.Lock()

  def _open(self, name: str):
    with self._lock:
      if name not in self._opened:
        spec = self._specs[name]
        kvstore = spec.get("kvstore", {})
        relative = kvstore.get("path") or spec.get("path")
        self._opened[name] = self._ts.open(
            {"driver": spec["driver"], "dtype": spec["dtype"],
             "kvstore": _kvstore(os.fspath(self.path), relative)},
            read=True, open=True, context=self._context)
      future = self._opened[name]
    try:
      return future.result()
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's status errors)
      raise CheckpointError(f"Cannot open {name} of the T5X checkpoint {self.path}: {e}. The "
                            "copy is incomplete or damaged.") from e

  def stored_bytes(self, name: str, box: Box) -> int:
    """The bytes of the chunks `box` touches (uncompressed; tensorstore decodes whole
    chunks), or of the box for arrays inline in the msgpack."""
    chunks = self._specs.get(name, {}).get("metadata", {}).get("chunks")
    if chunks is None:
      return super().stored_bytes(name, box)
    shape, itemsize = self.tensors[name].shape, self.tensors[name].dtype.itemsize
    extent = [min(-(-s.stop // c) * c, n) - (s.start // c) * c if s.stop > s.start else 0
              for s, c, n in zip(box, chunks, shape)]
    return int(np.prod(extent, dtype=np.int64)) * itemsize

  def _read(self, name: str, box: Box) -> np.ndarray:
    if name in self._inline:
      return self._inline[name][box] if box else self._inline[name]
    array = self._open(name)
    return np.asarray((array[box] if box else array).read().result())


# ----------------------------------------------------------------------------
# Names and the model's shape.


def _attention(ours: str, theirs: str, scanned: bool):
  for name in ("query", "key", "value"):
    yield f"{ours}/{name}/kernel", f"{theirs}/{name}/kernel", SAME if scanned else JOINED_IN
  yield f"{ours}/out/kernel", f"{theirs}/out/kernel", SAME if scanned else JOINED_OUT


def _layer(stack: str, config: T5Config, scanned: bool):
  """(our name under layers_i, T5X name under the layer) of one layer of `stack`."""
  attention = (("self_attention", "attention", "pre_attention_layer_norm"),) if stack == "encoder" \
      else (("self_attention", "self_attention", "pre_self_attention_layer_norm"),
            ("encoder_decoder_attention", "encoder_decoder_attention",
             "pre_cross_attention_layer_norm"))
  for ours, theirs, norm in attention:
    yield f"{norm}/scale", f"{norm}/scale", SAME
    yield from _attention(ours, theirs, scanned)
  yield "pre_mlp_layer_norm/scale", "pre_mlp_layer_norm/scale", SAME
  for name in (("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")):
    yield f"mlp/{name}/kernel", f"mlp/{name}/kernel", SAME
  if config.relative_bias_per_layer:
    yield "relpos_bias/rel_embedding", "relpos_bias/rel_embedding", SAME


def name_map(config: T5Config, scanned: bool):
  """(our path, T5X name, layout) of every parameter of `config` (unrolled)."""
  yield "shared/embedding", "token_embedder/embedding", SAME
  for stack, num in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    for i in range(num):
      for ours, theirs, layout in _layer(stack, config, scanned):
        if scanned:
          yield f"{stack}/layers_{i}/{ours}", f"{stack}/{stack}/{theirs}", layout.at_layer(i)
        else:
          yield f"{stack}/layers_{i}/{ours}", f"{stack}/layers_{i}/{theirs}", layout
    if not config.relative_bias_per_layer:
      yield f"{stack}/relpos_bias/rel_embedding", f"{stack}/relpos_bias/rel_embedding", SAME
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    yield f"{stack}/{norm}/scale", f"{stack}/{norm}/scale", SAME
  if not config.tie_word_embeddings:
    yield "lm_head/kernel", "decoder/logits_dense/kernel", SAME


def _shape_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """T5Config fields the stored shapes determine."""
  vocab_size, d_model = shapes["token_embedder/embedding"]
  scanned = "encoder/encoder/attention/query/kernel" in shapes
  if scanned:
    _, num_layers, num_heads, d_kv = shapes["encoder/encoder/attention/query/kernel"]
    num_decoder_layers = shapes["decoder/decoder/self_attention/query/kernel"][1]
    num_buckets = shapes["encoder/encoder/relpos_bias/rel_embedding"][-1]
    mlp, per_layer = "encoder/encoder/mlp", True
  else:
    count = lambda stack: sum(1 for n in shapes
                              if re.fullmatch(rf"{stack}/layers_\d+/pre_mlp_layer_norm/scale", n))
    num_layers, num_decoder_layers = count("encoder"), count("decoder")
    per_layer = "encoder/relpos_bias/rel_embedding" not in shapes
    relpos = shapes["encoder/layers_0/relpos_bias/rel_embedding" if per_layer
                    else "encoder/relpos_bias/rel_embedding"]
    num_heads, num_buckets = relpos
    d_kv = shapes["encoder/layers_0/attention/query/kernel"][1] // num_heads
    mlp = "encoder/layers_0/mlp"
  gated = f"{mlp}/wi_0/kernel" in shapes
  d_ff = shapes[f"{mlp}/wi_0/kernel" if gated else f"{mlp}/wi/kernel"][-1]
  return dict(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
              num_decoder_layers=num_decoder_layers, num_heads=num_heads,
              relative_attention_num_buckets=num_buckets, relative_bias_per_layer=per_layer,
              tie_word_embeddings="decoder/logits_dense/kernel" not in shapes,
              feed_forward_proj="gated-gelu" if gated else "relu")


def _matching_preset(fields: Mapping) -> T5Config | None:
  """The first preset with these shapes (its activation then counts)."""
  compared = [k for k in fields if k != "feed_forward_proj"]
  gated = fields["feed_forward_proj"].startswith("gated")
  for preset in presets.MODEL_PRESETS.values():
    if (all(getattr(preset, k) == fields[k] for k in compared)
        and preset.feed_forward_proj.startswith("gated") == gated):
      return preset
  return None


class T5XCheckpoint:
  """A T5X checkpoint: its arrays, the model's shape, and where each parameter is."""

  def __init__(self, path: str):
    directory = step_directory(path)
    if directory is None:
      raise CheckpointError(f"{path} is not a T5X checkpoint (no `{CHECKPOINT_FILE}` file in it "
                            "or in a checkpoint_<step> directory under it)")
    self.directory = os.fspath(directory)
    self.source = path
    self.arrays = T5XArrays(directory)
    self.shapes = {n: info.shape for n, info in self.arrays.tensors.items()}
    self.scanned = "encoder/encoder/attention/query/kernel" in self.shapes
    try:
      self._fields = _shape_fields(self.shapes)
    except (KeyError, ValueError) as e:
      raise CheckpointError(f"{self.directory} holds T5X arrays but not a T5 encoder-decoder's "
                            f"(no {e}); miniend_jax reads t5x's T5 and scalable T5 layouts") from e

  def config(self, **overrides) -> T5Config:
    """The model's T5Config; `param_dtype` defaults to the stored dtype."""
    preset = _matching_preset(self._fields)
    fields = dict(self._fields)
    if preset is not None:
      fields.update(feed_forward_proj=preset.feed_forward_proj,
                    relative_attention_max_distance=preset.relative_attention_max_distance)
    stored = str(self.arrays.tensors["token_embedder/embedding"].dtype)
    fields.update(param_dtype=stored, dropout_rate=0.0)
    fields.update(overrides)
    return T5Config(**fields)

  def entries(self, config: T5Config) -> dict[str, sliced_read.Entry]:
    """{our path: Entry} for `config` (unrolled paths), checked against the stored shapes.
    Layers of a scanned tensor come one after another, so they share chunk reads."""
    expected = sliced_read.flat_shapes(config)
    entries, problems = {}, []
    for ours, theirs, layout in name_map(config, self.scanned):
      num = config.num_layers if theirs.startswith("encoder") else config.num_decoder_layers
      want = layout.stored_shape(expected[ours], num)
      if theirs not in self.shapes:
        problems.append(f"missing {theirs}")
      elif self.shapes[theirs] != want:
        problems.append(f"{theirs} has shape {self.shapes[theirs]}, the model needs {want}")
      else:
        entries[ours] = sliced_read.Entry(self.arrays, theirs, layout)
    if problems:
      raise CheckpointError(f"The T5X checkpoint {self.directory} does not match the model: "
                            + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    return dict(sorted(entries.items(), key=lambda kv: (kv[1].name, kv[1].layout.layer or 0)))
