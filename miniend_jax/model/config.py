"""The T5 model config and the sizes it implies, without importing JAX.

`T5Config` lives here (and is re-exported by `model/t5.py`) so that what only
reads configs (presets, `miniend models`, `--help`, run records) answers at
once instead of loading JAX and Flax first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np

FEED_FORWARD_KINDS = ("relu", "gated-gelu", "gated-relu", "gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model; field names follow Hugging Face's `T5Config`.

  `dtype` is the compute dtype (activations, matmuls); `param_dtype` the storage
  dtype of the parameters. bf16 compute with f32 parameters is the usual
  training setting; layer norms and softmaxes always run in float32.
  `logits_dtype` is the output head's result dtype: float32 by default even for
  bf16 models, so distillation targets are not rounded to bf16 (logits of 16-64
  would move by up to 0.125-0.25); bfloat16 halves the logits' memory.

  `scan_layers` stores each stack's layers as one stacked subtree ("layers",
  leading logical axis "layers") and runs the layers no tap asks for under
  `jax.lax.scan`, so XLA compiles one layer body instead of every layer (see
  `t5.stack_layer_params` / `t5.unstack_layer_params` to convert parameters).

  `attention_impl` picks the attention kernel (the same math; see
  `t5.attention_implementation`): "explicit" einsums and softmax, "xla" or
  "cudnn" through `jax.nn.dot_product_attention` (cuDNN: fused flash attention
  on NVIDIA GPUs, bf16/fp16 only), "auto" cuDNN where it applies, else explicit.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False
  logits_dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                 "num_decoder_layers", "num_heads",
                 "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}.")
    if self.feed_forward_proj not in FEED_FORWARD_KINDS:
      raise ValueError(
          f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
          f"use one of {FEED_FORWARD_KINDS}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"T5Config.remat_policy={self.remat_policy!r} is unknown; "
          f"use one of {REMAT_POLICIES}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"T5Config.attention_impl={self.attention_impl!r} is unknown; "
          f"use one of {ATTENTION_IMPLS}.")
    for name in ("dtype", "param_dtype", "logits_dtype"):
      try:
        np.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is not a dtype.") from e
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise ValueError(f"T5Config.scan_layers must be True or False, got {self.scan_layers!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}.")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self):
    import jax  # pylint: disable=import-outside-toplevel
    name = self.feed_forward_proj.removeprefix("gated-")
    if name == "gelu":
      # Hugging Face maps "gated-gelu" to gelu_new, the tanh approximation.
      return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.relu

  @property
  def inner_dim(self) -> int:
    """Width of the joined attention heads, num_heads * d_kv."""
    return self.num_heads * self.d_kv

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def count_params(config: T5Config) -> int:
  """The number of parameters of a T5 of `config`, from its shapes alone."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  attention = 4 * d * inner  # query, key, value, out
  mlp = (3 if config.is_gated else 2) * d * ff
  relpos = config.relative_attention_num_buckets * config.num_heads
  encoder = config.num_layers * (2 * d + attention + mlp) + relpos + d
  decoder = config.num_decoder_layers * (3 * d + 2 * attention + mlp) + relpos + d
  head = 0 if config.tie_word_embeddings else d * config.vocab_size
  return config.vocab_size * d + encoder + decoder + head
