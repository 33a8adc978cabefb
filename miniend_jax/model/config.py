"""The T5 model config, the sizes it implies and the taps request, without importing JAX.

`T5Config`, `Taps` and the sizes (`count_params`, `forward_flops`) live here (and
are re-exported by `model/t5.py`) so that what only reads configs (presets,
`miniend models`, `--help`, run records, distillation recipes) answers at once
instead of loading JAX and Flax first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np

# The feed-forward activations, by transformers' ACT2FN names (a T5 config's
# `feed_forward_proj` is one of them, optionally prefixed "gated-"); the value
# names the JAX function (see `T5Config.activation`). transformers maps
# "gated-gelu" to gelu_new (tanh), and plain "gelu" to the exact (erf) GELU.
ACTIVATIONS = {
    "relu": "relu", "relu6": "relu6", "gelu": "gelu_exact", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
    "silu": "silu", "swish": "silu", "mish": "mish", "tanh": "tanh", "sigmoid": "sigmoid",
    "linear": "identity",
}
FEED_FORWARD_KINDS = tuple(prefix + name for prefix in ("", "gated-") for name in ACTIVATIONS)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn", "pallas")


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
  `params.stack_layer_params` / `params.unstack_layer_params` to convert parameters).

  `relative_bias_per_layer`: every layer's self-attention has its own
  relative-position table (umT5, model_type "umt5"), instead of one table per
  stack shared by all layers (T5, mT5).

  `attention_impl` picks the attention kernel (the same math; see
  `ops.attention_implementation`): "explicit" einsums and softmax, "xla" or
  "cudnn" through `jax.nn.dot_product_attention` (cuDNN: fused flash attention
  on NVIDIA GPUs, bf16/fp16 only), "pallas" the project's flash attention for
  TPU (`flash_attention.py`; interpreted, slowly, elsewhere), "auto" Pallas on
  TPUs, cuDNN where it applies, else explicit.
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
  relative_bias_per_layer: bool = False

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
          f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; use an "
          f"activation of {sorted(ACTIVATIONS)}, optionally prefixed 'gated-' "
          "(e.g. 'gated-gelu' for T5 v1.1, 'gated-silu' for UL2).")
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
    for name in ("scan_layers", "relative_bias_per_layer"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"T5Config.{name} must be True or False, got {getattr(self, name)!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}.")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self):
    """The feed-forward activation, as transformers' T5 applies it."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    if self.feed_forward_proj == "gated-gelu":  # transformers' special case
      return functools.partial(jax.nn.gelu, approximate=True)
    kind = ACTIVATIONS[self.feed_forward_proj.removeprefix("gated-")]
    return {
        "relu": jax.nn.relu, "relu6": jax.nn.relu6,
        "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu, "mish": jax.nn.mish, "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid, "identity": lambda x: x,
    }[kind]

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
  layer_relpos, stack_relpos = (relpos, 0) if config.relative_bias_per_layer else (0, relpos)
  encoder = config.num_layers * (2 * d + attention + mlp + layer_relpos) + stack_relpos + d
  decoder = (config.num_decoder_layers * (3 * d + 2 * attention + mlp + layer_relpos)
             + stack_relpos + d)
  head = 0 if config.tie_word_embeddings else d * config.vocab_size
  return config.vocab_size * d + encoder + decoder + head


def forward_flops(config: T5Config, batch: int, input_len: int, target_len: int) -> float:
  """Matmul FLOPs of one forward pass (2 per multiply-add), the usual MFU numerator.

  Counts projections, feed-forward, attention scores and mixing (full square,
  as computed) and the output head; ignores norms, softmax and elementwise ops.
  A training step costs about 3x its forward (backward = 2x).
  """
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  ff_mats = 3 if config.is_gated else 2
  enc_tokens, dec_tokens = batch * input_len, batch * target_len
  encoder = config.num_layers * (
      enc_tokens * (4 * d * inner + ff_mats * d * ff) + enc_tokens * 2 * input_len * inner)
  decoder = config.num_decoder_layers * (
      dec_tokens * (6 * d * inner + ff_mats * d * ff)      # self q,k,v,o; cross q,o; mlp
      + enc_tokens * 2 * d * inner                          # cross k,v over the encoder output
      + dec_tokens * 2 * (target_len + input_len) * inner)  # self and cross scores + mixing
  head = dec_tokens * d * config.vocab_size
  return 2.0 * (encoder + decoder + head)


@dataclasses.dataclass(frozen=True)
class Taps:
  """Which layers' attention internals and hidden states a forward pass returns.

  Each field is a tuple of layer indices; negative indices count from the end
  (-1 is the last layer). Attention taps return the query, key and value
  projections before the head split; hidden taps return a block's output.
  """

  encoder_self: tuple[int, ...] = ()
  decoder_self: tuple[int, ...] = ()
  decoder_cross: tuple[int, ...] = ()
  encoder_hidden: tuple[int, ...] = ()
  decoder_hidden: tuple[int, ...] = ()

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, (int, np.integer)):
        value = (value,)
      object.__setattr__(self, field.name, tuple(int(i) for i in value))

  def normalize(self, config: T5Config) -> "Taps":
    """Returns the same request with non-negative, sorted, unique indices.

    Raises:
      ValueError: naming the tap and the valid range, for a layer that does not exist.
    """
    return dataclasses.replace(self, **{
        field.name: tuple(sorted({
            layer_index(config, field.name, i, f"Tap {field.name}={i}")
            for i in getattr(self, field.name)}))
        for field in dataclasses.fields(self)})


def layer_index(config: T5Config, kind: str, index: int, what: str,
                owner: str = "the model") -> int:
  """`index` of a layer of the stack `kind` names ("encoder_*" or "decoder_*"), made
  non-negative (negative indices count from the last layer).

  Raises:
    ValueError: starting with `what`, naming the stack's size and the valid range.
  """
  stack = "encoder" if kind.startswith("encoder") else "decoder"
  num = config.num_layers if stack == "encoder" else config.num_decoder_layers
  if not -num <= index < num:
    raise ValueError(f"{what} asks for a layer that does not exist: {owner}'s {stack} has "
                     f"{num} layers, so valid indices are {-num}..{num - 1}.")
  return index % num
