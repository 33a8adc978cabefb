"""Random T5 parameters drawn by numpy, for tests about anything but initialisation.

`t5.init_params` runs the model's initialisers op by op: every new parameter shape
compiles its own random-normal program (~0.5 s each on CPU), seconds per config.
Where a test only needs *some* parameters of the right layout (an equivalence, a
gradient check), these cost nothing to compile.
"""

import jax
import numpy as np

from miniend_jax.model import t5


def random_params(config: t5.T5Config, seed: int = 0) -> dict:
  """Float32 numpy parameters shaped like `t5.init_params(config, ...)`: layer-norm
  scales 1 + N(0, 0.1^2), every other leaf N(0, 1 / fan_in) over its input axes (all
  but the last), so activations stay O(1). A scanned config gets the very same values,
  stacked (`t5.stack_layer_params`)."""
  rng = np.random.default_rng(seed)
  unrolled = config.replace(scan_layers=False)

  def draw(path, shape):
    if path[-1].key == "scale":
      return (1.0 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
    fan_in = int(np.prod(shape.shape[:-1]))
    return (rng.standard_normal(shape.shape) / np.sqrt(fan_in)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, t5.param_shapes(unrolled))
  return t5.stack_layer_params(params, unrolled) if config.scan_layers else params
