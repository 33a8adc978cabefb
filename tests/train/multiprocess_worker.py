"""One process of the multi-process test: a few distillation steps on a fixed global batch.

  python -m tests.train.multiprocess_worker --out OUT.npz [--num_processes N --process_id I --port P]

With N > 1 it joins a JAX distributed job over loopback through the same code
path a TPU pod or GPU cluster uses (`partitioning.maybe_initialize_distributed`,
driven by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
"""

import argparse
import os


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // args.num_processes}"
  if args.num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
                      JAX_NUM_PROCESSES=str(args.num_processes),
                      JAX_PROCESS_ID=str(args.process_id))

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  from miniend_jax.distill.recipe import get_recipe  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import partitioning, state as state_lib, steps  # pylint: disable=import-outside-toplevel
  from tests.train.test_steps import OPTIMIZER, STUDENT, TEACHER, make_batch  # pylint: disable=import-outside-toplevel

  assert partitioning.maybe_initialize_distributed() == (args.num_processes > 1)
  assert jax.process_count() == args.num_processes and jax.device_count() == 8
  mesh_config = partitioning.MeshConfig(data=2, fsdp=2, model=2)
  mesh = partitioning.make_mesh(mesh_config)
  recipe = get_recipe("miniend_d").resolve(TEACHER, STUDENT)
  tx = state_lib.make_optimizer(OPTIMIZER)
  state = state_lib.create_sharded_state(
      lambda rng: {"model": t5.init_params(STUDENT, rng), "distill": {}}, tx, mesh,
      logical_specs={"model": t5.param_logical_axes(STUDENT), "distill": {}},
      init_args=(jax.random.key(1),))
  teacher_sharding = partitioning.logical_to_sharding(t5.param_logical_axes(TEACHER), mesh)
  teacher = jax.jit(lambda rng: t5.init_params(TEACHER, rng),
                    out_shardings=teacher_sharding)(jax.random.key(0))
  step = steps.make_distill_step(STUDENT, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state),
                                 teacher_config=TEACHER, teacher_sharding=teacher_sharding)
  batch_sharding = partitioning.batch_sharding(mesh)
  losses = []
  for i in range(args.steps):
    global_batch = make_batch(seed=i)
    # This host's rows: those of the batch shards on its devices, in order.
    index = batch_sharding.addressable_devices_indices_map(global_batch["encoder_input_tokens"].shape)
    rows = sorted({(s[0].start or 0, s[0].stop) for s in index.values()})
    local = {k: np.concatenate([v[a:b] for a, b in rows]) for k, v in global_batch.items()}
    state, metrics = step(state, teacher, partitioning.host_local_to_global(local, mesh),
                          jax.random.key(5))
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params["model"], tiled=True)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(args.out, losses=np.asarray(losses), **flat)


if __name__ == "__main__":
  main()
