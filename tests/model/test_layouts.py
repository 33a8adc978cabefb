"""Stored layouts against numpy: every block of every parameter read through its stored
box equals the block cut from the parameter itself; a T5X teacher loads sliced where
neither torch nor TensorFlow is installed (the lean leg runs this file without them)."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from miniend_jax.model import hf, layouts, stacking, t5
from miniend_jax.train import partitioning
from tests.model import checkpoint_testing, t5x_testing

pytestmark = pytest.mark.lean

# (kind, our shape): D=6, H=4, K=3 (heads and d_kv differ, so a mix-up shows).
CASES = [("same", (6, 5)), ("transpose", (6, 5)), ("heads_rows", (6, 4, 3)),
         ("heads_cols", (4, 3, 6)), ("joined_in", (6, 4, 3)), ("joined_out", (4, 3, 6))]


def _blocks(shape, rng):
  """Every split of each axis in two, plus random sub-ranges (whole heads are not
  required: a d_kv axis may be cut too)."""
  for axis in range(len(shape)):
    for cut in range(1, shape[axis]):
      for part in (slice(0, cut), slice(cut, shape[axis])):
        yield tuple(part if a == axis else slice(None) for a in range(len(shape)))
  for _ in range(20):
    yield tuple(slice(a, rng.integers(a + 1, n + 1)) for n in shape
                for a in [int(rng.integers(0, n))])


@pytest.mark.parametrize("kind,shape", CASES)
@pytest.mark.parametrize("layer", [None, 2])
def test_every_block_reads_from_its_stored_box(kind, shape, layer):
  rng = np.random.default_rng(0)
  ours = rng.normal(size=shape)
  layout = layouts.Layout(kind)
  stored = layout.to_stored(ours)
  assert stored.shape == layout.stored_shape(shape)
  if layer is not None:  # a stack of 4 layers along axis 1, ours being layer 2
    others = [layout.to_stored(rng.normal(size=shape)) for _ in range(3)]
    stored = np.stack(others[:2] + [stored] + others[2:], axis=1)
    layout = layout.at_layer(layer)
    assert stored.shape == layout.stored_shape(shape, 4)
  for index in _blocks(shape, rng):
    box = layout.box(shape, index)
    np.testing.assert_array_equal(layout.block(stored[box], shape, index), ours[index])


def test_bounding_box_and_within():
  boxes = [(slice(2, 4), slice(0, 3)), (slice(0, 1), slice(5, 6))]
  outer = layouts.bounding_box(boxes)
  assert outer == (slice(0, 4), slice(0, 6)) and layouts.box_size(outer) == 24
  assert layouts.within(boxes[0], outer) == (slice(2, 4), slice(0, 3))


def test_a_t5x_teacher_loads_sliced_without_torch_or_tensorflow(tmp_path):
  config = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                       num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-silu",
                       tie_word_embeddings=False)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        t5.param_shapes(config))
  hf.save_hf(config, params, str(tmp_path / "hf"))
  state = load_file(str(tmp_path / "hf" / "model.safetensors"))
  t5x_dir = t5x_testing.write_t5x(
      tmp_path / "t5x", checkpoint_testing.t5x_params(state, tied=False))
  scanned = config.replace(scan_layers=True)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(scanned), mesh)
  # gated-SiLU: no preset has these shapes, so the activation is named by the caller.
  got_config, got = hf.load_hf_sharded(t5x_dir, shardings, feed_forward_proj="gated-silu",
                                       scan_layers=True)
  assert got_config.replace(dropout_rate=config.dropout_rate, scan_layers=False) == config
  assert stacking.is_scanned(got)
  jax.tree.map(np.testing.assert_array_equal, got, t5.stack_layer_params(params, scanned))
