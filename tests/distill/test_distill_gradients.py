"""Which student parameters each recipe trains: exactly those it should.

Reasoning, per recipe, for a student whose last layers are tapped (dropout off,
ce_weight = 0 so the student's own cross-entropy sends no gradient):

* A relation term at layer L reads that layer's Q/K/V projections, so it
  trains their kernels, the layer norm in front of them and everything below
  (earlier layers, embeddings, relative position biases) - but not that
  layer's attention output projection, its MLP, or the stack's final norm.
* Decoder cross-attention reads queries from the decoder (after the layer's
  self-attention sublayer, so its output projection is trained) and keys and
  values from the *encoder output*: the whole encoder, final norm included, is
  trained through the cross K/V.
* Decoder self-attention at layer L >= 1 reads the output of decoder layer
  L-1, which contains cross-attention over the encoder output: so with two or
  more decoder layers MiniEnD-E also trains the encoder's last FFN and final
  norm (through the decoder's lower cross-attention). Only with a single
  decoder layer are they untouched; both cases are asserted.
* A logits term trains everything (tied or untied output layer).
"""

import jax
import numpy as np
import pytest

import distill_tiny_models as tiny
from miniend_jax.distill import recipe as R

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

ONE_DECODER_LAYER = tiny.config(num_decoder_layers=1)
UNTIED_GATED = tiny.config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _paths(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _trained(recipe, student_cfg, teacher_cfg=tiny.TEACHER):
  """Returns ({param path: has nonzero gradient}, extra-param grads)."""
  recipe = recipe.resolve(teacher_cfg, student_cfg)
  t_taps, s_taps = recipe.required_taps(teacher_cfg, student_cfg)
  b = tiny.batch(seed=5)
  t_out = tiny.apply(teacher_cfg, tiny.params(teacher_cfg, 0), b, t_taps)
  extra = recipe.init_extra_params(jax.random.key(1), teacher_cfg, student_cfg)

  # Eager (op-by-op) on purpose: primitives compiled once are reused by every
  # test, where a jit would recompile the whole model per recipe and config.
  def grads(sp, extra):
    def loss(sp, extra):
      s_out = tiny.apply(student_cfg, sp, b, s_taps)
      return R.recipe_loss(recipe, t_out, s_out, b, 0, extra)[0]
    return jax.grad(loss, argnums=(0, 1))(sp, extra)

  gs, ge = grads(tiny.params(student_cfg, 2), extra)
  flat = _paths(gs)
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  return {k: bool(np.any(v != 0)) for k, v in flat.items()}, ge


def _untrained(trained):
  return {k for k, v in trained.items() if not v}


def _under(prefix, names):
  return {f"{prefix}/{n}" for n in names}


MLP = ("mlp/wi/kernel", "mlp/wo/kernel")
ATTN = lambda name: tuple(f"{name}/{p}/kernel" for p in ("query", "key", "value", "out"))


@pytest.mark.parametrize("name", ["miniend_d", "miniend_e"])
def test_with_logits_everything_is_trained(name):
  trained, _ = _trained(R.get_recipe(name), UNTIED_GATED)
  assert "lm_head/kernel" in trained and "decoder/layers_1/mlp/wi_0/kernel" in trained
  assert _untrained(trained) == set()


@pytest.mark.parametrize("student_cfg,last", [
    (tiny.STUDENT, "decoder/layers_1"),
    # With one decoder layer, cross-attention K/V are the encoder's only path.
    (ONE_DECODER_LAYER, "decoder/layers_0"),
])
def test_miniend_d_nologit(student_cfg, last):
  trained, _ = _trained(R.get_recipe("miniend_d_nologit"), student_cfg)
  assert _untrained(trained) == (
      _under(last, ("encoder_decoder_attention/out/kernel",
                    "pre_mlp_layer_norm/scale") + MLP)
      | {"decoder/decoder_norm/scale"})
  # The whole encoder, final norm included, learns through cross K/V.
  assert all(v for k, v in trained.items() if k.startswith("encoder/"))


def test_cross_queries_alone_do_not_reach_the_encoder():
  last = "decoder/layers_0"
  # Dropping the K-K and V-V cross relations cuts the encoder off entirely.
  q_only = R.Recipe(name="q_only", ce_weight=0.0, terms=(
      R.Term("decoder_self"), R.Term("decoder_cross", pairs=("qq",))))
  trained, _ = _trained(q_only, ONE_DECODER_LAYER)
  untrained = _untrained(trained)
  assert {k for k in trained if k.startswith("encoder/")} <= untrained
  assert {f"{last}/encoder_decoder_attention/{p}/kernel" for p in ("key", "value")} <= untrained
  assert trained[f"{last}/encoder_decoder_attention/query/kernel"]


def test_miniend_e_nologit_single_decoder_layer():
  trained, _ = _trained(R.get_recipe("miniend_e_nologit"), ONE_DECODER_LAYER)
  assert _untrained(trained) == (
      _under("encoder/layers_1", ("self_attention/out/kernel",
                                  "pre_mlp_layer_norm/scale") + MLP)
      | {"encoder/encoder_norm/scale"}
      | _under("decoder/layers_0", ("self_attention/out/kernel",
                                    "pre_cross_attention_layer_norm/scale",
                                    "pre_mlp_layer_norm/scale")
               + ATTN("encoder_decoder_attention") + MLP)
      | {"decoder/decoder_norm/scale", "decoder/relpos_bias/rel_embedding"})


def test_miniend_e_nologit_two_decoder_layers():
  trained, _ = _trained(R.get_recipe("miniend_e_nologit"), tiny.STUDENT)
  # The encoder's last FFN and final norm ARE trained here, through decoder
  # layer 0's cross-attention feeding decoder layer 1's self-attention Q/K/V.
  assert trained["encoder/encoder_norm/scale"]
  assert trained["encoder/layers_1/mlp/wo/kernel"]
  assert _untrained(trained) == (
      _under("decoder/layers_1", ("self_attention/out/kernel",
                                  "pre_cross_attention_layer_norm/scale",
                                  "pre_mlp_layer_norm/scale")
             + ATTN("encoder_decoder_attention") + MLP)
      | {"decoder/decoder_norm/scale"})


def test_hidden_mse_trains_its_projections():
  trained, extra_grads = _trained(R.get_recipe("hidden_mse"), tiny.STUDENT)
  assert set(extra_grads) == {"encoder_hidden", "decoder_hidden"}
  assert all(np.any(g["kernel"]) for g in extra_grads.values())
  # Block outputs before the final norm: the final norms are untouched; the
  # decoder's last block output also depends on the encoder (cross K/V).
  assert _untrained(trained) == {"decoder/decoder_norm/scale"}
