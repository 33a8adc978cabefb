"""`miniend plan`: a tiny distillation step compiled by libtpu for TPU slices this host lacks."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

pytest.importorskip("libtpu", reason="planning needs the `plan` extra (libtpu)")

from miniend_jax.cli import plan as plan_command  # noqa: E402
from miniend_jax.model import t5  # noqa: E402
from miniend_jax.train import hardware, partitioning, plan, program, state, steps  # noqa: E402
from miniend_jax.train import xla_cost  # noqa: E402

# Every per-chip shard is whole TPU tiles (minor dims of 128, second-minor of 8),
# so XLA's layouts add no padding and the argument bytes can be computed exactly.
TEACHER = t5.T5Config(vocab_size=256, d_model=256, d_kv=64, d_ff=256, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=128,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=0.0, dtype="bfloat16", param_dtype="float32")
STUDENT = TEACHER.replace(num_layers=1, num_decoder_layers=1, param_dtype="float32")
TRAIN = program.TrainConfig(batch_size=32, inputs_length=128, targets_length=128, pack=False)
MESH = partitioning.MeshConfig(data=2, fsdp=2)


def _program(topology: str, slices: int = 1, train=TRAIN, mesh=MESH, **model_changes):
  devices = plan.topology_devices(topology, slices)
  return program.build_step_program(
      "distill", train, program.ModelSetup(teacher="unused"), state.OptimizerConfig(), mesh,
      "miniend_d", devices=devices, student_config=STUDENT.replace(**model_changes),
      teacher_config=TEACHER.replace(**model_changes))


def _argument_bytes(*trees) -> int:
  """Per-chip bytes of the step's arguments from their shardings: each leaf's shard,
  in TPU allocations of at least 512 bytes (scalars, the rng key, small vectors)."""
  total = 0
  for leaf in jax.tree.leaves(trees):
    shard = leaf.sharding.shard_shape(leaf.shape)
    itemsize = 8 if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else np.dtype(
        leaf.dtype).itemsize
    total += max(512, math.ceil(math.prod(shard) * itemsize / 512) * 512)
  return total


@pytest.mark.parametrize("name,expected", [
    ("v4-64", ("v4:2x4x4", 32)), ("v4-8", ("v4:2x2x1", 4)), ("v5p-128", ("v5p:4x4x4", 64)),
    ("v5e-256", ("v5e:16x16", 256)), ("v5litepod-8", ("v5e:2x4", 8)), ("v6e-64", ("v6e:8x8", 64)),
    ("v5e:4x8", ("v5e:4x8", 32)), ("V4:2x2x2", ("v4:2x2x2", 8))])
def test_topology_names(name, expected):
  topology = plan.parse_topology(name)
  assert (topology.topology_name, topology.chips) == expected
  assert topology.hbm_bytes == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}[
      topology.generation.name] * plan.GiB


@pytest.mark.parametrize("name,message", [
    ("v4-6", "powers of two, e.g. v4-8, v4-16"), ("v7-8", "generation 'v7'"), ("v4", "GENERATION-SIZE"),
    ("v5e:2x2x2", "2 dimensions")])
def test_bad_topology_names_say_what_is_accepted(name, message):
  with pytest.raises(plan.PlanError, match=message):
    plan.parse_topology(name)


def test_plan_figures_come_from_the_tpu_compiler():
  prog = _program("v5e-4")
  assert {d.platform for d in prog.mesh.devices.flat} == {"tpu"}
  report = plan.plan_program(prog, plan.parse_topology("v5e-4"))
  assert report.fits and report.chips == 4 and report.mesh == {"data": 2, "fsdp": 2, "model": 1}
  # The compiler's per-chip arguments are the sharded state, teacher and batch (the
  # rng key feeds only dropout, which is off: jit drops unused arguments).
  assert report.argument_bytes == _argument_bytes(
      prog.abstract_state, prog.abstract_teacher, prog.abstract_batch)
  # The state is donated: its buffers are reused for the new state.
  assert report.alias_bytes >= plan.shard_bytes(prog.abstract_state) > 0
  assert report.bytes_per_chip == (report.argument_bytes + report.output_bytes
                                   - report.alias_bytes + report.temp_bytes
                                   + report.generated_code_bytes)
  # XLA counts every op (not only matmuls) of the per-chip program, times 4 chips.
  # Unrolled layers and the losses' logits in one chunk (`losses.chunk_positions`
  # at this size): no loop, so the count is whole, not a flagged lower bound.
  assert 0.9 < report.xla_flops / prog.analytic_flops < 1.5
  assert report.compile_s > 0 and not report.xla_counts_loops_once and not report.xla_loops
  assert report.xla_flops == report.xla_flops_counted_once and report.xla_bytes_accessed > 0
  assert report.step_s(0.5) == pytest.approx(
      prog.analytic_flops / (0.5 * 197e12 * 4))
  assert report.tokens_per_s(0.5) == pytest.approx(32 * 256 / report.step_s(0.5))
  table = report.table()
  assert "FITS" in table and "v5e:2x2" in table and "temporaries" in table
  assert "roofline per chip: compute" in table and "819 GB/s HBM bandwidth" in table


def test_two_slices_compile_on_a_hybrid_mesh():
  mesh = partitioning.MeshConfig(data=2, fsdp=2, dcn_data=2)
  prog = _program("v5e-4", slices=2, mesh=mesh, train=dataclasses.replace(TRAIN, batch_size=64))
  slices = {d.slice_index for d in prog.mesh.devices.flat}
  assert slices == {0, 1} and prog.mesh.shape["data"] == 4
  report = plan.plan_program(prog, plan.parse_topology("v5e-4"), slices=2)
  assert report.fits and report.chips == 8
  # Twice the batch over twice the chips: the same per-chip arguments as one slice.
  assert report.argument_bytes == _argument_bytes(
      prog.abstract_state, prog.abstract_teacher, prog.abstract_batch)


def test_a_plan_too_large_is_an_answer_with_knobs():
  big = program.TrainConfig(batch_size=1024, inputs_length=2048, targets_length=512, pack=False)
  # Explicit attention: its float32 [batch, heads, 2048, 2048] scores are what does not fit
  # (the TPU default, the fused kernel, keeps them out of HBM and this step would fit).
  prog = _program("v5e-4", train=big, attention_impl="explicit")
  report = plan.plan_program(prog, plan.parse_topology("v5e-4"))
  assert not report.fits and report.excess_bytes > 0
  assert report.bytes_per_chip > report.xla_hbm_limit_bytes and report.xla_message
  bindings = " ".join(k.binding for k in report.knobs)
  assert "remat_policy" in bindings and "TrainConfig.batch_size = 512" in bindings
  assert "MeshConfig.fsdp = 4" in bindings
  verdict = report.verdict()
  assert verdict.startswith("DOES NOT FIT: one chip needs") and "too much" in verdict
  assert "grad_accum_steps = 2" in verdict
  assert json.loads(json.dumps(report.to_json()))["fits"] is False


def test_plan_command_answers_and_rejects_bad_configs(capsys):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = plan_command.add_arguments(argparse.ArgumentParser())
  bindings = ["ModelSetup.teacher = 't5-v1_1-tiny'", "ModelSetup.student_shape = '1L-32H'",
              "TrainConfig.batch_size = 8", "TrainConfig.inputs_length = 64",
              "TrainConfig.targets_length = 16", "MeshConfig.data = 4"]
  args = parser.parse_args(["--topology", "v5e-4", "--json", "--recipe", "kd_logits"])
  assert plan_command.run_from_args(args, bindings) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["fits"] and report["chips"] == 4 and report["mesh"]["data"] == 4
  assert report["step_s_at_50pct_mfu"] > 0 and report["xla_flops"] > 0

  args = parser.parse_args(["--topology", "v5e-3"])
  assert plan_command.run_from_args(args, bindings) == 2
  assert capsys.readouterr().err.startswith("miniend: TPU topology 'v5e-3'")
  args = parser.parse_args(["--topology", "v5e-4"])
  assert plan_command.run_from_args(args, bindings + ["TrainConfig.batch_size = 6"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("miniend: ") and "batch_size=6" in err and len(err.splitlines()) == 1


def test_one_hardware_table_for_mfu_logging_and_plans():
  assert plan.GENERATIONS is hardware.TPU_GENERATIONS
  for name, smallest in (("v4", "v4-8"), ("v5e", "v5e-4"), ("v5p", "v5p-8"), ("v6e", "v6e-4")):
    topology = plan.parse_topology(smallest)
    # The kind libtpu's devices of that slice report is the one MFU logging looks up.
    kind = plan.topology_devices(topology)[0].device_kind
    assert hardware.chip_for_device_kind(kind) is topology.generation is plan.GENERATIONS[name]
    assert steps.device_peak_flops(kind) == steps.PEAK_FLOPS[kind] == topology.peak_flops
    assert topology.hbm_bandwidth == topology.generation.hbm_bandwidth > 0
  assert hardware.chip_for_device_kind("NVIDIA A100-SXM4-80GB").hbm_bandwidth == 2.039e12
  assert hardware.chip_for_device_kind("NVIDIA A100-SXM4-40GB").hbm_bandwidth == 1.555e12


def _one_chip(*shapes):
  mesh = Mesh(np.array(plan.topology_devices("v5e:1x1")), ("d",))
  return [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
          for shape in shapes]


@pytest.mark.parametrize("m,k,n,bound", [(256, 2048, 256, "memory"), (2048, 2048, 2048, "compute")])
def test_roofline_from_the_compilers_counts(m, k, n, bound):
  topology = plan.parse_topology("v5e:1x1")
  lowered = jax.jit(jnp.matmul).lower(*_one_chip((m, k), (k, n)))
  report = plan.plan_lowered(lowered, topology, analytic_flops=2 * m * k * n, tokens_per_step=m)
  cost = lowered.compile().cost_analysis()
  flops, nbytes = cost["flops"], cost["bytes accessed"]
  assert flops == 2 * m * k * n and report.xla_bytes_accessed == nbytes
  # By hand: v5e's 197 TFLOP/s and 819 GB/s per chip.
  step = max(flops / 197e12, nbytes / 819e9)
  assert report.roofline.step_s == pytest.approx(step) and report.roofline.bound == bound
  assert report.roofline_mfu == pytest.approx(2 * m * k * n / (step * 197e12))
  # Model FLOPs the program does not perform (an analytic count of work XLA
  # dropped) do not count: the MFU stays what XLA's FLOPs allow.
  overcounted = dataclasses.replace(report, analytic_flops=3 * 2 * m * k * n)
  assert overcounted.roofline_mfu == pytest.approx(report.roofline_mfu)
  summary = report.to_json()
  assert summary["roofline_step_s"] == pytest.approx(step) and summary["roofline_bound"] == bound
  # libtpu's own estimate is sound for a matmul, reported only when positive.
  assert report.compiler_step_s == cost["optimal_seconds"] > 0
  negative = dataclasses.replace(report, xla_optimal_seconds=-738.0)
  assert negative.compiler_step_s is None and negative.to_json()["compiler_step_s"] is None
  assert "optimal_seconds): not positive, not used" in negative.table()
  # Nor when it claims the FLOPs run faster than peak.
  too_fast = dataclasses.replace(report, xla_optimal_seconds=0.5 * report.roofline.compute_s)
  assert too_fast.compiler_step_s is None and "below the compute bound, not used" in too_fast.table()


def _layers(scan: bool, layers: int):
  """A tiny deep net (tanh(x @ w_i) for each i), its layers unrolled or a lax.scan."""
  def loss(w, x):
    if scan:
      x, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
    else:
      for i in range(layers):
        x = jnp.tanh(x @ w[i])
    return x.astype(jnp.float32).sum()
  return loss


def test_loops_are_counted_by_trip_count():
  layers, width = 8, 256
  mesh = Mesh(np.array(plan.topology_devices("v5e-4")), ("d",))
  args = (jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16,
                               sharding=NamedSharding(mesh, PartitionSpec())),
          jax.ShapeDtypeStruct((512, width), jnp.bfloat16,
                               sharding=NamedSharding(mesh, PartitionSpec("d"))))
  cost = {}
  for scan in (False, True):
    for grad in (False, True):
      fn = _layers(scan, layers)
      cost[scan, grad] = xla_cost.step_cost(jax.jit(jax.grad(fn) if grad else fn)
                                            .lower(*args).compile())
  # XLA counts a scan's body once: one layer of eight.
  assert cost[True, False].counted_once_flops < 0.2 * cost[False, False].flops
  assert [loop.trip_count for loop in cost[True, False].loops] == [layers]
  assert [loop.trip_count for loop in cost[True, True].loops] == [layers, layers]  # fwd, bwd
  # Recounted, the scanned forward has the unrolled one's FLOPs (its float32 sums aside);
  # its backward within 5%.
  assert cost[True, False].flops == pytest.approx(cost[False, False].flops, rel=1e-3)
  assert cost[True, True].flops == pytest.approx(cost[False, True].flops, rel=0.05)
  assert cost[True, True].bytes_accessed > 2 * cost[True, True].counted_once_bytes
  assert not cost[False, True].loops and not cost[True, True].uncounted_loops

  # A loop whose end depends on data has no trip count in the HLO: counted once, and said.
  def until_small(x):
    return jax.lax.while_loop(lambda h: jnp.abs(h).max() > 1, lambda h: jnp.tanh(h @ h) / 2,
                              x).sum()
  square = jax.ShapeDtypeStruct((width, width), jnp.bfloat16,
                                sharding=NamedSharding(mesh, PartitionSpec()))
  report = plan.plan_lowered(jax.jit(until_small).lower(square), plan.parse_topology("v5e-4"),
                             analytic_flops=1.0, tokens_per_step=1)
  assert report.xla_counts_loops_once and report.xla_loops[0]["trip_count"] is None
  assert report.xla_flops == report.xla_flops_counted_once
  assert "roofline per chip (a lower bound)" in report.table()
  assert "0 of 1 loops recounted" in report.table()


def test_the_distill_step_keeps_no_per_example_scores_on_tpu():
  """The training step as `miniend plan` compiles it (the base run's recipe,
  miniend_d, and its 512 input positions; tiny models), data-parallel on a v4-8:
  attention and the relations over encoder positions run as Pallas kernels
  (`auto` on TPU), and the optimized per-chip program holds no float [.., 512,
  512] buffer with more leading elements than the shared position bias [heads,
  512, 512]: nothing per example (8 per chip here)."""
  train = dataclasses.replace(TRAIN, inputs_length=512, targets_length=64)
  prog = _program("v4-8", train=train, mesh=partitioning.MeshConfig(data=4))
  hlo = prog.lower().compile().as_text()
  # Mosaic calls: attention's (forward, backward), and the relation kernel's,
  # known by its outputs, a float32 sum per (example, head): [8, heads, 1, 128].
  mosaic = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  relation = [line for line in mosaic if re.search(r"= \(f32\[8,\d+,1,128\]", line)]
  assert relation and len(mosaic) > len(relation), (len(mosaic), len(relation))
  shapes = {tuple(int(d) for d in dims.split(","))
            for dims in re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]+)\]", hlo)}
  scores = {s for s in shapes if len(s) >= 3 and s[-2:] == (512, 512)}
  assert (TEACHER.num_heads, 512, 512) in scores, scores
  assert all(math.prod(s[:-2]) <= TEACHER.num_heads for s in scores), scores
