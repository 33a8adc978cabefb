"""The forward pass under real meshes of 8 fake CPU devices equals the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.model import t5
from miniend_jax.train import partitioning

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

CONFIG = t5.T5Config(vocab_size=128, d_model=32, d_kv=4, d_ff=64, num_layers=2,
                     num_decoder_layers=2, num_heads=8, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False)
TAPS = t5.Taps(encoder_self=(-1,), decoder_self=(0,), decoder_cross=(-1,))


def _inputs():
  rng = np.random.default_rng(0)
  enc = rng.integers(1, CONFIG.vocab_size, size=(8, 12)).astype(np.int32)
  enc[:, 9:] = 0
  dec = rng.integers(1, CONFIG.vocab_size, size=(8, 6)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def _forward(params, enc, dec):
  return t5.T5(CONFIG).apply({"params": params}, enc, dec, taps=TAPS)


@pytest.mark.parametrize("mesh_config", [
    partitioning.MeshConfig(data=8),
    partitioning.MeshConfig(data=2, fsdp=2, model=2),
    partitioning.MeshConfig(data=1, fsdp=1, model=8),
], ids=["data8", "data2-fsdp2-model2", "model8"])
def test_sharded_forward_equals_unsharded(mesh_config):
  assert jax.device_count() == 8
  params = t5.init_params(CONFIG, jax.random.key(0))
  enc, dec = _inputs()
  reference = jax.jit(_forward)(params, enc, dec)

  mesh = partitioning.make_mesh(mesh_config)
  rules = mesh_config.logical_axis_rules
  param_shardings = partitioning.logical_to_sharding(t5.param_logical_axes(CONFIG), mesh, rules)
  sharded_params = jax.device_put(params, param_shardings)
  batch = partitioning.host_local_to_global({"enc": enc, "dec": dec}, mesh, rules)
  with partitioning.mesh_context(mesh, rules):
    out = jax.jit(_forward)(sharded_params, batch["enc"], batch["dec"])

  # The layout really is sharded the way the rules say.
  q_kernel = sharded_params["encoder"]["layers_0"]["self_attention"]["query"]["kernel"]
  expected_heads_shards = mesh_config.shape(8)[2]
  assert q_kernel.sharding.shard_shape(q_kernel.shape)[1] == CONFIG.num_heads // expected_heads_shards
  assert len(batch["enc"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, reference)


def test_mesh_config_errors_are_clear():
  with pytest.raises(ValueError, match="needs 12 devices, but 8"):
    partitioning.MeshConfig(data=3, fsdp=2, model=2).shape(8)
  with pytest.raises(ValueError, match="not divisible"):
    partitioning.MeshConfig(data=-1, model=3).shape(8)
  assert partitioning.MeshConfig(data=-1, fsdp=2, model=2).shape(8) == (2, 2, 2)
