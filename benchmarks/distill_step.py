"""One distillation step: our jitted JAX step against an equivalent PyTorch step.

  python benchmarks/distill_step.py --teacher t5-v1_1-base --student 6L-384H \
      --recipe miniend_d --batch 8 --inputs 128 --targets 32 --steps 5 [--impl jax|torch|both]

Prints one JSON line per implementation with step_s (median after warm-up),
tokens_per_s (input + target tokens), compile_s (first step), peak_rss_mb,
step_temp_mb (ours: XLA's temporaries of the compiled step, i.e. activations and
loss work without parameters and optimizer state; `--head formed` for the step
whose models form whole float32 logits) and
mfu (analytic matmul FLOPs: teacher forward + 3x student forward, over the
device's peak; on CPU the peak is this machine's measured float32 matmul rate).
`--impl both` runs each in its own process (so peak RSS is each one's own) and
then prints a line with the ratio. `first_loss` is the loss of the first step
(before any update): the two implementations must agree on it, which checks
that they compute the same thing.

The PyTorch step is Hugging Face's T5ForConditionalGeneration for teacher and
student (same random weights as ours, exported with save_hf; with `--teacher_dir`,
as `--impl both` passes, ours writes its teacher there after its steps and
PyTorch's reads it instead of drawing the same weights again), q/k/v captured
with forward hooks, the recipe's terms written in torch, AdamW; the teacher is
cast to `--teacher_dtype`, and `--dtype bfloat16` runs the student under
torch.autocast (bf16 matmuls, float32 weights), as ours does; attention is
PyTorch's fused SDPA. On a CUDA machine both sides run on the GPU and report
`peak_device_mb`; ours reports the attention kernel it ran (`--attention`,
default auto: cuDNN flash attention on GPUs for bf16). Only the
recipes' term kinds logits / encoder_self / decoder_self / decoder_cross are
implemented there.

Imports neither seqio nor TensorFlow (accelerator images lack them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measured_cpu_peak() -> float:
  """Float32 matmul FLOP/s this CPU sustains (numpy/BLAS, 2048^3)."""
  a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
  a @ a
  times = []
  for _ in range(3):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
  return 2 * 2048 ** 3 / min(times)


def _peak_flops(device_kind: str, backend: str) -> tuple[float, str]:
  from miniend_jax.train.steps import device_peak_flops  # pylint: disable=import-outside-toplevel
  peak = device_peak_flops(device_kind)
  if peak:
    return peak, "datasheet"
  if backend == "cpu":
    return _measured_cpu_peak(), "measured_cpu_f32_matmul"
  return float("nan"), "unknown"


def _configs(args):
  from miniend_jax.distill.named import get_recipe  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import presets, student  # pylint: disable=import-outside-toplevel
  teacher = presets.get_model_config(args.teacher, dropout_rate=0.0, dtype=args.teacher_dtype,
                                     attention_impl=args.attention)
  student_cfg = student.student_config(teacher.replace(dtype=args.dtype), args.student,
                                       dropout_rate=0.0)
  recipe = get_recipe(args.recipe).resolve(teacher, student_cfg)
  return teacher, student_cfg, recipe


def _batch(vocab, args):
  rng = np.random.default_rng(0)
  targets = rng.integers(2, vocab, (args.batch, args.targets)).astype(np.int32)
  return {
      "encoder_input_tokens": rng.integers(2, vocab, (args.batch, args.inputs)).astype(np.int32),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": np.concatenate(
          [np.zeros((args.batch, 1), np.int32), targets[:, :-1]], axis=1),
      "decoder_loss_weights": np.ones(targets.shape, np.float32),
  }


def _flops(teacher, student_cfg, recipe, args) -> float:
  from miniend_jax.train.steps import step_flops  # pylint: disable=import-outside-toplevel
  return step_flops(student_cfg, teacher if recipe.needs_teacher else None, args.batch,
                    args.inputs, args.targets)


def run_jax(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import partitioning, state as state_lib, steps  # pylint: disable=import-outside-toplevel

  teacher, student_cfg, recipe = _configs(args)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
  tx = state_lib.make_optimizer(state_lib.OptimizerConfig(
      learning_rate=1e-4, warmup_steps=0, total_steps=1000, decay="constant"))

  def init(rng):
    return {"model": t5.init_params(student_cfg, rng),
            "distill": recipe.init_extra_params(rng, teacher, student_cfg)}

  state = state_lib.create_sharded_state(
      init, tx, mesh, logical_specs={"model": t5.param_logical_axes(student_cfg),
                                     "distill": jax.tree.map(
                                         lambda _: jax.sharding.PartitionSpec(),
                                         jax.eval_shape(lambda: recipe.init_extra_params(
                                             jax.random.key(0), teacher, student_cfg)))},
      init_args=(jax.random.key(1),))
  teacher_sharding = partitioning.logical_to_sharding(t5.param_logical_axes(teacher), mesh)
  teacher_params = None
  if recipe.needs_teacher:
    # Born sharded and in the teacher's storage dtype (bf16 by default).
    teacher_params = jax.jit(
        lambda rng: jax.tree.map(lambda x: x.astype(args.teacher_dtype),
                                 t5.init_params(teacher, rng)),
        out_shardings=teacher_sharding)(jax.random.key(0))
  step = steps.make_distill_step(student_cfg, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state),
                                 teacher_config=teacher if recipe.needs_teacher else None,
                                 teacher_sharding=teacher_sharding if recipe.needs_teacher else None,
                                 fused_head=args.head == "fused")
  batch = partitioning.host_local_to_global(_batch(student_cfg.vocab_size, args), mesh)
  rng = jax.random.key(0)

  start = time.perf_counter()
  # Compiled ahead of time so XLA's own accounting of the step's temporaries
  # (activations and loss work, without the arguments: parameters, optimizer
  # state, batch) can be reported; the same executable then runs the steps.
  step = step.lower(state, teacher_params, batch, rng).compile()
  memory = step.memory_analysis()
  if args.compile_only:
    _hand_over_teacher(args, teacher, teacher_params)
    return dict(benchmark="distill_step_compiled", impl="jax", teacher=args.teacher,
                student=args.student, recipe=args.recipe, batch=args.batch, inputs=args.inputs,
                targets=args.targets, dtype=args.dtype, teacher_dtype=args.teacher_dtype,
                head=args.head, vocab=student_cfg.vocab_size, backend=jax.default_backend(),
                compile_s=round(time.perf_counter() - start, 3),
                step_temp_mb=round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
                step_argument_mb=round(memory.argument_size_in_bytes / 2**20, 1)
                if memory else None)
  state, metrics = step(state, teacher_params, batch, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  first_loss = float(metrics["loss"])
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, teacher_params, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
  result = _result("jax", args, teacher, student_cfg, recipe, statistics.median(times),
                   compile_s, first_loss, float(metrics["loss"]), str(device.device_kind),
                   jax.default_backend(), jax.device_count(), attention=args.attention,
                   head=args.head, vocab=student_cfg.vocab_size,
                   step_temp_mb=round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
                   attention_kernel=t5.attention_implementation(student_cfg),
                   peak_device_mb=round(peak_bytes / 2**20, 1) if peak_bytes else None)
  _hand_over_teacher(args, teacher, teacher_params)  # after the figures: they omit the copy
  return result


def _hand_over_teacher(args, teacher, teacher_params) -> None:
  """Writes our teacher to --teacher_dir for PyTorch's side. float32 holds its values
  exactly (bf16 included); PyTorch's side casts them back to --teacher_dtype."""
  if args.teacher_dir and teacher_params is not None:
    from miniend_jax.model import hf  # pylint: disable=import-outside-toplevel
    hf.save_hf(teacher, teacher_params, args.teacher_dir, dtype="float32")


def _torch_relation(a, b, a_t, b_t, heads, row_mask, key_mask, causal):
  """KL(teacher || student) of multi-head relations; rows averaged over valid rows and heads."""
  import torch  # pylint: disable=import-outside-toplevel

  def relation(x, y):
    batch, len_x, width = x.shape
    hd = width // heads
    x = x.view(batch, len_x, heads, hd).transpose(1, 2)
    y = y.view(batch, y.shape[1], heads, hd).transpose(1, 2)
    scores = (x.float() @ y.float().transpose(-1, -2)) / hd ** 0.5
    mask = key_mask[:, None, None, :]
    if causal:
      mask = mask & torch.ones(len_x, y.shape[2], dtype=torch.bool,
                               device=x.device).tril()[None, None]
    return torch.log_softmax(scores.masked_fill(~mask, -1e9), dim=-1), mask

  log_s, mask = relation(a, b)
  with torch.no_grad():
    log_t, _ = relation(a_t, b_t)
  kl = (log_t.exp() * (log_t - log_s)).masked_fill(~mask, 0.0).sum(-1)  # [batch, heads, rows]
  rows = row_mask[:, None, :].float()
  return (kl * rows).sum() / (rows.sum() * heads)


def run_torch(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf, t5  # pylint: disable=import-outside-toplevel

  teacher, student_cfg, recipe = _configs(args)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  models = {}
  with tempfile.TemporaryDirectory() as d:
    for name, cfg, seed in (("teacher", teacher, 0), ("student", student_cfg, 1)):
      if name == "teacher" and not recipe.needs_teacher:
        continue
      path = os.path.join(d, name)
      if name == "teacher" and args.teacher_dir:
        path = args.teacher_dir  # ours' teacher, as it ran
      else:
        hf.save_hf(cfg, t5.init_params(cfg.replace(dtype="float32"), jax.random.key(seed)),
                   path)
      # PyTorch's fused attention (SDPA: flash / memory-efficient kernels on GPUs).
      models[name] = transformers.T5ForConditionalGeneration.from_pretrained(
          path, dtype=torch.float32, attn_implementation="sdpa").to(device)
  if "teacher" in models:
    models["teacher"] = models["teacher"].to(torch_dtype[args.teacher_dtype]).eval()
    models["teacher"].requires_grad_(False)
  student_model = models["student"].train()
  optimizer = torch.optim.AdamW(student_model.parameters(), lr=1e-4, weight_decay=0.0)

  # Hooks capture the q/k/v projections the recipe's terms read.
  captured = {}
  def attach(model, side, kind, layer):
    stack = model.encoder if kind == "encoder_self" else model.decoder
    sub = (stack.block[layer].layer[1].EncDecAttention if kind == "decoder_cross"
           else stack.block[layer].layer[0].SelfAttention)
    for p in "qkv":
      getattr(sub, p).register_forward_hook(
          lambda m, i, o, key=(side, kind, layer, p): captured.__setitem__(key, o))
  for term in recipe.terms:
    if term.kind in ("encoder_self", "decoder_self", "decoder_cross"):
      attach(models["teacher"], "teacher", term.kind, term.teacher_layer)
      attach(student_model, "student", term.kind, term.student_layer)

  np_batch = _batch(student_cfg.vocab_size, args)
  batch = {k: (torch.as_tensor(v).long() if v.dtype == np.int32 else torch.as_tensor(v)).to(device)
           for k, v in np_batch.items()}
  enc_mask = batch["encoder_input_tokens"] != 0
  dec_mask = batch["decoder_target_tokens"] != 0

  def forward(model):
    return model(input_ids=batch["encoder_input_tokens"], attention_mask=enc_mask.long(),
                 decoder_input_ids=batch["decoder_input_tokens"]).logits

  def step():
    teacher_logits = None
    if "teacher" in models:
      with torch.no_grad():
        teacher_logits = forward(models["teacher"]).float()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      logits = forward(student_model).float()
    log_p = torch.log_softmax(logits, -1)
    weights = batch["decoder_loss_weights"]
    ce = -(log_p.gather(-1, batch["decoder_target_tokens"][..., None])[..., 0] * weights).sum() / weights.sum()
    z = torch.logsumexp(logits, -1)
    total = recipe.ce_weight * (ce + recipe.z_loss * ((z ** 2) * weights).sum() / weights.sum())
    for term in recipe.terms:
      if term.kind == "logits":
        t = term.temperature
        log_t = torch.log_softmax(teacher_logits / t, -1)
        kl = (log_t.exp() * (log_t - torch.log_softmax(logits / t, -1))).sum(-1)
        total = total + term.weight * t * t * (kl * dec_mask).sum() / dec_mask.sum()
        continue
      pair_losses = 0.0
      for pair in term.pairs:
        a, b = pair[0], pair[1]
        get = lambda side, p, layer: captured[(side, term.kind, layer, p)]
        if term.kind == "decoder_cross" and pair != "qq":
          rows, keys, causal = enc_mask, enc_mask, False
        elif term.kind == "encoder_self":
          rows, keys, causal = enc_mask, enc_mask, False
        else:
          rows, keys, causal = dec_mask, dec_mask, term.kind == "decoder_self"
        pair_losses = pair_losses + _torch_relation(
            get("student", a, term.student_layer), get("student", b, term.student_layer),
            get("teacher", a, term.teacher_layer), get("teacher", b, term.teacher_layer),
            term.relation_heads, rows, keys, causal)
      if term.pair_reduction == "mean":
        pair_losses = pair_losses / len(term.pairs)
      total = total + term.weight * pair_losses
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(student_model.parameters(), 1.0)  # as ours (grad_clip_norm)
    optimizer.step()
    return float(total)

  start = time.perf_counter()
  first_loss = step()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  on_gpu = device == "cuda"
  return _result("torch", args, teacher, student_cfg, recipe, statistics.median(times), compile_s,
                 first_loss, loss, torch.cuda.get_device_name() if on_gpu else "cpu",
                 "gpu" if on_gpu else "cpu", 1, torch_threads=torch.get_num_threads(),
                 peak_device_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1)
                 if on_gpu else None)


def _result(impl, args, teacher, student_cfg, recipe, step_s, compile_s, first_loss, loss,
            device_kind, backend, devices, **extra) -> dict:
  peak, peak_source = _peak_flops(device_kind, backend)
  flops = _flops(teacher, student_cfg, recipe, args)
  tokens = args.batch * (args.inputs + args.targets)
  return dict(benchmark="distill_step", impl=impl, teacher=args.teacher, student=args.student,
              recipe=args.recipe, batch=args.batch, inputs=args.inputs, targets=args.targets,
              teacher_dtype=args.teacher_dtype, dtype=args.dtype, backend=backend,
              device=device_kind, devices=devices, step_s=round(step_s, 4),
              tokens_per_s=round(tokens / step_s, 1), compile_s=round(compile_s, 3),
              peak_rss_mb=round(_peak_rss_mb(), 1), step_tflops=round(flops / 1e12, 4),
              mfu=round(flops / step_s / peak, 4), peak_flops_source=peak_source,
              first_loss=round(first_loss, 4), loss=round(loss, 4), **extra)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher", default="t5-v1_1-base")
  parser.add_argument("--student", default="6L-384H")
  parser.add_argument("--recipe", default="miniend_d")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--teacher_dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                      help="student compute dtype (parameters stay float32)")
  parser.add_argument("--impl", default="jax", choices=["jax", "torch", "both"])
  parser.add_argument("--attention", default="auto", choices=["auto", "explicit", "xla", "cudnn"],
                      help="our models' attention kernel (T5Config.attention_impl); 'auto' "
                      "is cuDNN flash attention on GPUs for bf16, explicit elsewhere")
  parser.add_argument("--head", default="fused", choices=["fused", "formed"],
                      help="ours: 'fused' forms the logits chunk by chunk inside the losses "
                      "(the default training step), 'formed' has the models form float32 "
                      "[batch, targets, vocab] logits first")
  parser.add_argument("--compile_only", action="store_true",
                      help="ours: compile the step and report XLA's memory accounting "
                      "without running it (shapes too large for this machine)")
  parser.add_argument("--teacher_dir",
                      help="ours writes its teacher's weights here (Hugging Face format) "
                      "after its steps; PyTorch's reads them instead of drawing the same "
                      "ones again (--impl both passes a temporary one to both)")
  args = parser.parse_args()
  if args.impl == "both":
    lines = {}
    with tempfile.TemporaryDirectory() as scratch:
      args.teacher_dir = args.teacher_dir or os.path.join(scratch, "teacher")
      for impl in ("jax", "torch"):
        argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
                if k != "impl" and v is not False and v is not None]
        out = subprocess.run([sys.executable, __file__, *argv, "--impl", impl], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        lines[impl] = json.loads(out)
    print(json.dumps({"benchmark": "distill_step_ratio", "batch": args.batch,
                      "inputs": args.inputs, "targets": args.targets,
                      "device": lines["jax"]["device"],
                      "jax_over_torch_throughput": round(
                          lines["torch"]["step_s"] / lines["jax"]["step_s"], 3),
                      "jax_mfu": lines["jax"]["mfu"], "torch_mfu": lines["torch"]["mfu"]}))
    return
  print(json.dumps(run_jax(args) if args.impl == "jax" else run_torch(args)), flush=True)


if __name__ == "__main__":
  main()
