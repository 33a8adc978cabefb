"""T5 encoder-decoder in Flax linen, exact against Hugging Face's T5, with attention taps.

Both families are covered by one config:
  * T5 v1.0: ReLU feed-forward, output projection tied to the input embedding and
    scaled by d_model**-0.5;
  * T5 v1.1 / T5-efficient: gated-GELU feed-forward, separate output projection.

Distillation needs the attention internals of chosen layers (MiniLMv2 relations
are built from the query, key and value projections), so `T5.__call__` takes a
`Taps` request and returns exactly those tensors, computing nothing for layers
that were not asked for.

Every parameter carries logical axis names (t5x style: "vocab", "embed", "mlp",
"heads", "kv", "relpos_buckets") and the main activations carry logical
constraints, so `train/partitioning.py` maps them onto any mesh.

This module assembles the model: blocks, the encoder and decoder stacks (unrolled,
or scanned over stacked layer parameters), the output head and the decoding cache.
The layers are in `layers.py`, the JAX-only operations in `ops.py`, `T5Config`
and `Taps` in `config.py`, the parameter trees (init, shapes, logical axes,
stacking) in `params.py`; their public names stay importable from here.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from miniend_jax.model.config import T5Config, Taps
from miniend_jax.model.layers import Attention, Dense, FeedForward, RelativePositionBias, RMSNorm
from miniend_jax.model.ops import (MASK_BIAS, REMAT_CHECKPOINT_POLICIES, AttentionMasks,
                                   attention_implementation, matmul)

# re-exported: users import them from here
from miniend_jax.model.config import (  # noqa: F401
    REMAT_POLICIES, count_params, forward_flops, layer_index)
from miniend_jax.model.layers import AttentionTap  # noqa: F401
from miniend_jax.model.ops import (  # noqa: F401
    dot_f32, relative_position_buckets)

Array = jax.Array


@flax.struct.dataclass
class T5Output:
  """What `T5.__call__` returns.

  logits: [batch, target_len, vocab_size] in `config.logits_dtype` (float32 by default);
    None when called with `project_logits=False`, which returns the head's operands
    instead, for losses that form the logits a chunk at a time
    (`distill.losses.ProjectedLogits`):
  head_hidden: [batch, target_len, d_model] in the compute dtype, the decoder output as
    the head sees it (rescaled by d_model^-0.5 when the embedding is tied).
  head_kernel: [d_model, vocab_size] in the compute dtype; logits = head_hidden @
    head_kernel, accumulated in float32.
  encoder_self / decoder_self / decoder_cross: {layer: AttentionTap}, keyed by the
    non-negative layer index. Cross-attention queries come from the decoder
    ([batch, target_len, ...]), keys and values from the encoder output
    ([batch, input_len, ...]).
  encoder_hidden / decoder_hidden: {layer: [batch, len, d_model]}, the block's
    output before the stack's final layer norm.
  """

  logits: Array | None
  encoder_self: Mapping[int, AttentionTap] = flax.struct.field(default_factory=dict)
  decoder_self: Mapping[int, AttentionTap] = flax.struct.field(default_factory=dict)
  decoder_cross: Mapping[int, AttentionTap] = flax.struct.field(default_factory=dict)
  encoder_hidden: Mapping[int, Array] = flax.struct.field(default_factory=dict)
  decoder_hidden: Mapping[int, Array] = flax.struct.field(default_factory=dict)
  head_hidden: Array | None = None
  head_kernel: Array | None = None


def _norm(cfg: T5Config, name: str) -> RMSNorm:
  return RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                 name=name)


def _activation_constraint(x: Array) -> Array:
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class EncoderBlock(nn.Module):
  """Pre-norm self-attention and feed-forward, each with dropout and a residual."""

  config: T5Config
  deterministic: bool = True
  tap_self: bool = False

  @nn.compact
  def __call__(self, x: Array, bias: Array | AttentionMasks):
    """bias: [batch or 1, heads or 1, len, len], or its parts (`_stack_bias`); with
    `relative_bias_per_layer` only the masks, this layer adds its own relative positions."""
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    if cfg.relative_bias_per_layer:
      bias = _add_position(bias, _relative_bias(
          RelativePositionBias(cfg, bidirectional=True, name="relpos_bias"), x.shape[1]))
    h = _norm(cfg, "pre_attention_layer_norm")(x)
    h, tap = Attention(cfg, self.deterministic, self.tap_self, name="self_attention")(h, h, bias)
    x = _activation_constraint(x + drop(h))
    h = FeedForward(cfg, self.deterministic, name="mlp")(_norm(cfg, "pre_mlp_layer_norm")(x))
    x = _activation_constraint(x + drop(h))
    return x, tap


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention over the encoder, feed-forward."""

  config: T5Config
  deterministic: bool = True
  tap_self: bool = False
  tap_cross: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array | AttentionMasks,
               cross_bias: Array | AttentionMasks, decode_position: Array | None = None):
    """self_bias: [batch or 1, heads or 1, len, keys] (keys: len, or the cache's
    length when decoding), or its parts (`_stack_bias`); with
    `relative_bias_per_layer` only the masks, this layer adds its own relative
    positions (at row `decode_position` when decoding one position)."""
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    if cfg.relative_bias_per_layer:
      keys = (self_bias.key_mask.shape[1] if isinstance(self_bias, AttentionMasks)
              else self_bias.shape[-1])
      self_bias = _add_position(self_bias, _relative_bias(
          RelativePositionBias(cfg, bidirectional=False, name="relpos_bias"),
          keys, decode_position))
    h = _norm(cfg, "pre_self_attention_layer_norm")(x)
    h, self_tap = Attention(cfg, self.deterministic, self.tap_self, self.decode,
                            name="self_attention")(h, h, self_bias)
    x = _activation_constraint(x + drop(h))
    h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
    h, cross_tap = Attention(cfg, self.deterministic, self.tap_cross,
                             name="encoder_decoder_attention")(h, encoded, cross_bias)
    x = _activation_constraint(x + drop(h))
    h = FeedForward(cfg, self.deterministic, name="mlp")(_norm(cfg, "pre_mlp_layer_norm")(x))
    x = _activation_constraint(x + drop(h))
    return x, self_tap, cross_tap


def _relative_bias(relpos: "RelativePositionBias", length: int,
                   position: Array | None = None) -> Array:
  """Self-attention relative-position bias [1, heads, length, length], or only
  row `position` of it ([1, heads, 1, length]) for one decoding step."""
  table = relpos(length, length)
  if position is None:
    return table
  return jax.lax.dynamic_slice_in_dim(table, position, 1, axis=2)


def _add_position(bias: Array | AttentionMasks, position: Array) -> Array | AttentionMasks:
  """`bias` with the relative-position bias [1, heads, q, kv] added (kept apart in
  `AttentionMasks`)."""
  if isinstance(bias, AttentionMasks):
    return bias.add_position(position)
  return bias + position


def _stack_bias(cfg: T5Config, masks: AttentionMasks, deterministic: bool
                ) -> Array | AttentionMasks:
  """What a stack's layers get: the parts for the fused kernel, which builds the
  masks per block; else the combined additive bias, built once for all layers."""
  fused = attention_implementation(
      cfg, dropout=not deterministic and cfg.dropout_rate > 0) == "pallas"
  return masks if fused else masks.additive()


def _maybe_remat(block_cls, cfg: T5Config):
  if cfg.remat_policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_CHECKPOINT_POLICIES[cfg.remat_policy], prevent_cse=True)


# Logical name of the leading axis of stacked layer parameters (`scan_layers`).
LAYERS_AXIS = "layers"
# The parameter of a stack that holds its layers when `scan_layers` stacks them.
STACKED_LAYERS = "layers"


def _stacked_layers(module: nn.Module, make_block, num_layers: int, tapped: set[int],
                    x: Array, args: tuple, deterministic: bool):
  """Runs a stack whose layers' parameters are stacked along a leading axis.

  The stacked parameters are `module`'s "layers" param: the parameter tree of one
  block with a leading [num_layers] axis (logical name "layers"). Runs of layers
  not in `tapped` go through one `jax.lax.scan` each; tapped layers run on their
  own slice, so their taps are exactly those of the unrolled model. The remat
  policy applies to each layer (inside the scan body too).

  Args:
    module: the Encoder or Decoder (owner of the "layers" param and the rngs).
    make_block(i, deterministic, parent=None) -> the unbound block of layer i (its
      taps set for layer i); its __call__(x, *args) returns (x, *taps).
    tapped: layers whose outputs (taps, hidden state) are needed.

  Returns:
    (x after the last layer, {tapped layer: the block's outputs}).
  """
  cfg = module.config

  def init_stack(rng):
    # Zeros of the real shapes: the init never depends on the traced activations.
    dummies = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (x,) + args)
    block = make_block(-1, True, parent=None)
    boxed = jax.vmap(lambda r: block.init(r, *dummies)["params"])(
        jax.random.split(rng, num_layers))
    return jax.tree.map(
        lambda b: b.add_axis(0, {nn.PARTITION_NAME: LAYERS_AXIS})
        if isinstance(b, nn.meta.AxisMetadata) else b,
        boxed, is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata))

  stacked = module.param(STACKED_LAYERS, init_stack)
  base_rng = None if deterministic else module.make_rng("dropout")

  def layer_fn(i: int, in_scan: bool):
    block = make_block(i, deterministic, parent=None)

    def run(params, x, rng):
      rngs = {} if rng is None else {"dropout": rng}
      return block.apply({"params": params}, x, *args, rngs=rngs)

    if cfg.remat_policy == "none":
      return run
    return jax.checkpoint(run, policy=REMAT_CHECKPOINT_POLICIES[cfg.remat_policy],
                          prevent_cse=not in_scan)

  def layer_rngs(start: int, stop: int):
    if base_rng is None:
      return None
    return jax.vmap(lambda i: jax.random.fold_in(base_rng, i))(jnp.arange(start, stop))

  outputs, start = {}, 0
  while start < num_layers:
    if start in tapped:
      params = jax.tree.map(lambda a, i=start: a[i], stacked)
      rng = None if base_rng is None else jax.random.fold_in(base_rng, start)
      outputs[start] = layer_fn(start, False)(params, x, rng)
      x = outputs[start][0]
      start += 1
      continue
    stop = min([i for i in tapped if i > start] + [num_layers])
    run = layer_fn(-1, True)  # -1: a layer no tap asks for

    def body(carry, xs, run=run):
      params, rng = xs
      return run(params, carry, rng)[0], None

    segment = jax.tree.map(lambda a, b=start, e=stop: a[b:e], stacked)
    x, _ = jax.lax.scan(body, x, (segment, layer_rngs(start, stop)))
    start = stop
  return x, outputs


class Encoder(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, embedded: Array, mask: Array, segment_ids: Array | None,
               taps: Taps, deterministic: bool):
    """embedded: [batch, len, d_model]; mask: bool [batch, len].

    Returns (encoded [batch, len, d_model] after the final norm, {layer: tap}, {layer: hidden}).
    """
    cfg = self.config
    length = embedded.shape[1]
    masks = AttentionMasks(mask, segment_ids, segment_ids, None, length)
    if not cfg.relative_bias_per_layer:  # one table for the stack (T5, mT5)
      masks = masks.add_position(_relative_bias(
          RelativePositionBias(cfg, bidirectional=True, name="relpos_bias"), length))
    bias = _stack_bias(cfg, masks, deterministic)
    x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
    make_block = lambda i, det, **kw: EncoderBlock(cfg, det, i in taps.encoder_self, **kw)
    if cfg.scan_layers:
      x, outputs = _stacked_layers(self, make_block, cfg.num_layers,
                                   set(taps.encoder_self) | set(taps.encoder_hidden),
                                   x, (bias,), deterministic)
    else:
      block_cls = _maybe_remat(EncoderBlock, cfg)
      outputs = {}
      for i in range(cfg.num_layers):
        x, tap = block_cls(cfg, deterministic, i in taps.encoder_self, name=f"layers_{i}")(x, bias)
        outputs[i] = (x, tap)
    self_taps = {i: out[1] for i, out in outputs.items() if out[1] is not None}
    hidden = {i: outputs[i][0] for i in taps.encoder_hidden}
    x = _norm(cfg, "encoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x, self_taps, hidden


class Decoder(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, embedded: Array, encoded: Array, decoder_key_mask: Array,
               encoder_mask: Array, decoder_segment_ids: Array | None,
               encoder_segment_ids: Array | None, taps: Taps, deterministic: bool,
               decode: bool = False, max_decode_length: int | None = None):
    """embedded: [batch, tgt_len, d_model]; encoded: [batch, in_len, d_model].

    With `decode`, `embedded` is one position [batch, 1, d_model] and the
    self-attention reads keys/values cached for `max_decode_length` positions.

    Returns (decoded [batch, tgt_len, d_model] after the final norm,
    {layer: self tap}, {layer: cross tap}, {layer: hidden}).
    """
    cfg = self.config
    length = embedded.shape[1]
    position = None
    if decode:
      position, self_bias = self._decode_step_mask(max_decode_length)
      keys = self_bias.shape[-1]
    else:
      self_bias = AttentionMasks(decoder_key_mask, decoder_segment_ids, decoder_segment_ids,
                                 None, length, causal=True)
      keys = length
    if not cfg.relative_bias_per_layer:  # one table for the stack (T5, mT5)
      self_bias = _add_position(self_bias, _relative_bias(
          RelativePositionBias(cfg, bidirectional=False, name="relpos_bias"), keys, position))
    cross_bias = AttentionMasks(encoder_mask, decoder_segment_ids, encoder_segment_ids, None,
                                length)
    if not decode:
      self_bias = _stack_bias(cfg, self_bias, deterministic)
    cross_bias = _stack_bias(cfg, cross_bias, deterministic)
    x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
    if cfg.scan_layers:
      if decode:
        raise ValueError(
            "Incremental decoding runs unrolled layers: convert the parameters with "
            "unstack_layer_params(params, config) and use config.replace(scan_layers=False).")
      make_block = lambda i, det, **kw: DecoderBlock(
          cfg, det, i in taps.decoder_self, i in taps.decoder_cross, **kw)
      tapped = set(taps.decoder_self) | set(taps.decoder_cross) | set(taps.decoder_hidden)
      x, outputs = _stacked_layers(self, make_block, cfg.num_decoder_layers, tapped, x,
                                   (encoded, self_bias, cross_bias), deterministic)
    else:
      block_cls = _maybe_remat(DecoderBlock, cfg)
      outputs = {}
      for i in range(cfg.num_decoder_layers):
        outputs[i] = block_cls(
            cfg, deterministic, i in taps.decoder_self, i in taps.decoder_cross, decode,
            name=f"layers_{i}")(x, encoded, self_bias, cross_bias, position)
        x = outputs[i][0]
    self_taps = {i: out[1] for i, out in outputs.items() if out[1] is not None}
    cross_taps = {i: out[2] for i, out in outputs.items() if out[2] is not None}
    hidden = {i: outputs[i][0] for i in taps.decoder_hidden}
    x = _norm(cfg, "decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x, self_taps, cross_taps, hidden

  def _decode_step_mask(self, max_len: int) -> tuple[Array | None, Array]:
    """(the current position, or None on the allocating call; the causal mask bias
    over the cache: [1, 1, 1, max_len], or [1, 1, max_len, max_len] when allocating)."""
    initialised = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if not initialised:  # The allocating call runs the full length, causally.
      causal = jnp.tril(jnp.ones((max_len, max_len), dtype=bool))
      return None, jnp.where(causal, 0.0, MASK_BIAS)[None, None]
    current = position.value
    position.value = current + 1
    visible = jnp.arange(max_len) <= current
    return current, jnp.where(visible, 0.0, MASK_BIAS)[None, None, None, :]


class T5(nn.Module):
  """T5 encoder-decoder. Token id 0 is padding.

  Call:
    out = T5(config).apply({"params": params}, encoder_input_tokens, decoder_input_tokens,
                           enable_dropout=False, taps=Taps(decoder_self=(-1,)))
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(
        cfg.vocab_size, cfg.d_model,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name="shared")
    self.encoder = Encoder(cfg, name="encoder")
    self.decoder = Decoder(cfg, name="decoder")
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                           cfg.d_model ** -0.5, jnp.dtype(cfg.dtype),
                           jnp.dtype(cfg.param_dtype), out_dtype=jnp.dtype(cfg.logits_dtype),
                           name="lm_head")

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None, *,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               enable_dropout: bool = False, taps: Taps = Taps(),
               project_logits: bool = True) -> T5Output:
    """Runs encoder and decoder.

    Args:
      encoder_input_tokens: int [batch, input_len]; 0 is padding.
      decoder_input_tokens: int [batch, target_len]; the targets shifted right,
        starting with 0 (so they cannot give a padding mask).
      decoder_target_tokens: optional int [batch, target_len]; when given, its
        padding (0) is masked as decoder self-attention keys (t5x convention).
        Valid positions never see later keys, so this only matters for packing.
      encoder_segment_ids / decoder_segment_ids: optional int [batch, len] for
        packed examples; attention stays within a segment.
      enable_dropout: apply dropout (needs a "dropout" rng).
      taps: which layers' attention projections and hidden states to return.
      project_logits: False returns the output head's operands (`head_hidden`,
        `head_kernel`) instead of logits, so a loss can form them a chunk at a
        time and never hold [batch, target_len, vocab] (training does this).

    Returns:
      T5Output with logits [batch, target_len, vocab] (or the head's operands) and
      the requested taps.
    """
    cfg = self.config
    taps = taps.normalize(cfg)
    deterministic = not enable_dropout
    encoder_mask = encoder_input_tokens > 0
    encoded, enc_taps, enc_hidden = self.encoder(
        self._embed(encoder_input_tokens), encoder_mask, encoder_segment_ids, taps,
        deterministic)
    if decoder_target_tokens is None:
      decoder_key_mask = jnp.ones(decoder_input_tokens.shape, dtype=bool)
    else:
      decoder_key_mask = decoder_target_tokens > 0
    decoded, dec_taps, cross_taps, dec_hidden = self.decoder(
        self._embed(decoder_input_tokens), encoded, decoder_key_mask, encoder_mask,
        decoder_segment_ids, encoder_segment_ids, taps, deterministic)
    taps_out = dict(encoder_self=enc_taps, decoder_self=dec_taps, decoder_cross=cross_taps,
                    encoder_hidden=enc_hidden, decoder_hidden=dec_hidden)
    if project_logits:
      return T5Output(logits=self._logits(decoded), **taps_out)
    hidden, kernel = self._head_operands(decoded)
    return T5Output(logits=None, head_hidden=hidden, head_kernel=kernel, **taps_out)

  def encode(self, encoder_input_tokens: Array) -> Array:
    """Encoder output for generation: [batch, input_len, d_model] (no dropout)."""
    encoded, _, _ = self.encoder(self._embed(encoder_input_tokens), encoder_input_tokens > 0,
                                 None, Taps(), True)
    return encoded

  def decode_step(self, encoded: Array, encoder_input_tokens: Array, decoder_tokens: Array,
                  max_decode_length: int) -> Array:
    """One step of incremental decoding with a key/value cache.

    Call once with `decoder_tokens` of the full [batch, max_decode_length] and
    `mutable=["cache"]` to allocate the cache (its values are ignored), then with
    [batch, 1] tokens, one position at a time, passing the cache back in.

    Args:
      encoded: [batch, input_len, d_model] from `encode`.
      encoder_input_tokens: [batch, input_len], for the padding mask.
      decoder_tokens: int [batch, 1] (the previous token; 0 at the start).
      max_decode_length: the cache length.

    Returns:
      logits [batch, 1, vocab].
    """
    decoded, _, _, _ = self.decoder(
        self._embed(decoder_tokens), encoded, jnp.ones(decoder_tokens.shape, bool),
        encoder_input_tokens > 0, None, None, Taps(), True, decode=True,
        max_decode_length=max_decode_length)
    return self._logits(decoded)

  def _embed(self, tokens: Array) -> Array:
    return _activation_constraint(self.shared(tokens))

  def _head_operands(self, decoded: Array) -> tuple[Array, Array]:
    """(hidden [batch, len, d_model], kernel [d_model, vocab]) in the compute dtype,
    whose product `_logits` computes (same casts and scaling)."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      # Mesh TensorFlow's T5 rescales before the tied output projection.
      embedding = self.shared.embedding.astype(self.shared.dtype)
      hidden = (decoded * (cfg.d_model ** -0.5)).astype(self.shared.dtype)
      return hidden, embedding.T
    kernel = nn.meta.unbox(self.lm_head.variables["params"]["kernel"])
    return decoded.astype(cfg.dtype), kernel.astype(cfg.dtype)

  def _logits(self, decoded: Array) -> Array:
    cfg = self.config
    if cfg.tie_word_embeddings:
      logits = matmul(*self._head_operands(decoded), 1, cfg.logits_dtype)
    else:  # through the module, which creates the kernel at initialisation
      logits = self.lm_head(decoded)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def dummy_inputs(batch: int = 1, input_len: int = 8, target_len: int = 8):
  """Token arrays for initialisation and shape inference: int32 [batch, len] twos."""
  return (jnp.full((batch, input_len), 2, jnp.int32), jnp.full((batch, target_len), 2, jnp.int32))


# re-exported: users import these from here. Their home, model/params.py, builds on this
# module, so they load on first use (PEP 562) instead of importing each other in a cycle.
_PARAMS_NAMES = ("init_params", "param_logical_axes", "param_shapes", "stack_layer_params",
                 "unstack_layer_params")


def __getattr__(name: str):
  if name in _PARAMS_NAMES:
    from miniend_jax.model import params  # pylint: disable=import-outside-toplevel
    return getattr(params, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
