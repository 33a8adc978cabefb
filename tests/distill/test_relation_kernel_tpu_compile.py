"""On TPU, relation_kl(implementation="auto") runs the Pallas relation kernel
per batch shard.

The relation KL's value and student gradients, data-parallel over a v4-8 (4
chips, 4 examples each), over 512 encoder positions, is compiled by libtpu from
this CPU host (also with the widths split over a model axis: one relation
head per chip). Given the batch's mesh axes (as the training step passes them),
"auto" takes the kernel (the mesh's devices are TPUs): the program holds the
Mosaic call and no float [.., 512, 512] buffer. Without them it cannot know the
batch's sharding and tiles the relation in plain XLA instead (no Mosaic call),
which shows the check reads the choice.
"""

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import pytest

pytest.importorskip("libtpu", reason="compiling for TPU needs the `plan` extra (libtpu)")

from miniend_jax.distill import relations  # noqa: E402
from miniend_jax.train import partitioning, plan  # noqa: E402

BATCH, LENGTH, CHIPS = 16, 512, 4


def _compiled(batch_axes, head_axes=None, model=1) -> str:
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=CHIPS // model, model=model),
                                plan.topology_devices("v4-8"))
  with partitioning.mesh_context(mesh):
    rows = NamedSharding(mesh, PartitionSpec("data", None))
    tokens = NamedSharding(mesh, PartitionSpec("data", None, head_axes))
    teacher = jax.ShapeDtypeStruct((BATCH, LENGTH, 256), jnp.bfloat16, sharding=tokens)
    student = jax.ShapeDtypeStruct((BATCH, LENGTH, 128), jnp.bfloat16, sharding=tokens)
    mask = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.bool_, sharding=rows)

    def loss(teacher, student, mask):
      return relations.relation_kl(teacher, teacher, student, student, num_relation_heads=2,
                                   query_mask=mask, key_mask=mask, batch_axes=batch_axes,
                                   head_axes=head_axes)

    return jax.jit(jax.value_and_grad(loss, argnums=1)).lower(
        teacher, student, mask).compile().as_text()


def _relation_sized(hlo: str) -> set[tuple[int, ...]]:
  shapes = {tuple(int(d) for d in dims.split(","))
            for dims in re.findall(r"\b(?:f32|bf16)\[([0-9,]+)\]", hlo)}
  return {s for s in shapes if len(s) >= 2 and s[-2:] == (LENGTH, LENGTH)}


def test_auto_runs_the_relation_kernel_per_shard_on_tpu():
  hlo = _compiled(batch_axes="data")
  assert "tpu_custom_call" in hlo
  assert not _relation_sized(hlo), _relation_sized(hlo)
  # Its outputs: a KL sum per (example, relation head) of a chip, [4, 2, 1, 128].
  assert re.search(r"= \(f32\[4,2,1,128\]", hlo)
  # Without the batch's axes "auto" tiles in XLA: no Mosaic call.
  assert "tpu_custom_call" not in _compiled(batch_axes=None)
  # With the widths split over a model axis too, each chip computes its own
  # relation head: [8 examples, 1 head, 1, 128].
  split = _compiled(batch_axes="data", head_axes="model", model=2)
  assert re.search(r"= \(f32\[8,1,1,128\]", split) and not _relation_sized(split)
