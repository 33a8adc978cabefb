"""The relation KL alone, compiled for a TPU slice from this CPU host (libtpu, AOT):
explicit, blockwise and the Pallas kernel.

  python benchmarks/relation_kl_aot.py [--topology v4-8] [--batch 256] [--length 512] \
      [--teacher_width 768] [--student_width 384] [--heads 6] [--causal] [--block_size N]

Compiles the value and student gradients of one relation (`relation_kl`, e.g. the
base run's cross-attention K-K relation over 512 encoder positions: global batch
256 sharded over the slice's chips, bf16 inputs) for each implementation and
prints one JSON line each: XLA's FLOPs and bytes accessed per chip (loops counted
by their trip counts, `train/xla_cost.py`), the temporaries per chip, and the
relation-sized buffers (`[.., length, length]`) of the optimized program.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v4-8")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--teacher_width", type=int, default=768)
  parser.add_argument("--student_width", type=int, default=384)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--block_size", type=int, default=None,
                      help="blockwise tiles (default: relation_blocks.DEFAULT_BLOCK_SIZE)")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from miniend_jax.distill.relations import DEFAULT_BLOCK_SIZE, relation_kl  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import plan, xla_cost  # pylint: disable=import-outside-toplevel

  devices = plan.topology_devices(args.topology)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  batch_sharded = NamedSharding(mesh, P("data"))
  length = args.length
  block_size = args.block_size or DEFAULT_BLOCK_SIZE

  def abstract(width, dtype):
    return jax.ShapeDtypeStruct((args.batch, length, width), dtype, sharding=batch_sharded)

  teacher = abstract(args.teacher_width, jnp.bfloat16)
  student = abstract(args.student_width, jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((args.batch, length), jnp.bool_, sharding=batch_sharded)
  for implementation in ("explicit", "blockwise", "kernel"):
    def loss(t, s, m, implementation=implementation):
      # The kernel runs per chip inside shard_map over the batch's axis, as
      # the training step runs it (`batch_axes`); the others XLA partitions.
      return relation_kl(t, t, s, s, num_relation_heads=args.heads, query_mask=m,
                         key_mask=m, causal=args.causal, implementation=implementation,
                         block_size=block_size, batch_axes="data")
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.value_and_grad(loss, argnums=1)).lower(
          teacher, student, mask).compile()
    cost = xla_cost.step_cost(compiled)
    memory = compiled.memory_analysis()
    shapes = sorted({m.group(0) for m in re.finditer(r"[a-z]+[0-9]*\[[0-9,]+\]", compiled.as_text())
                     if m.group(0).count(str(length)) >= 2})
    print(json.dumps(dict(
        benchmark="relation_kl_aot", topology=args.topology, implementation=implementation,
        batch=args.batch, length=length, heads=args.heads, causal=args.causal,
        block_size=block_size, xla_gflops_per_chip=round(cost.flops / 1e9, 2),
        xla_gb_accessed_per_chip=round(cost.bytes_accessed / 1e9, 3),
        loops_uncounted=len(cost.uncounted_loops),
        temp_mb_per_chip=round(memory.temp_size_in_bytes / 2**20, 1),
        relation_sized_buffers=shapes)), flush=True)


if __name__ == "__main__":
  main()
