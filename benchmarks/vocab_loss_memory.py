"""Memory of the vocabulary-sized losses, from XLA's own accounting.

  python benchmarks/vocab_loss_memory.py [--batch 64] [--targets 114] \
      [--student_width 384] [--teacher_width 768] [--vocab 32128 250112] [--dtype bfloat16]

Compiles (ahead of time, on abstract shapes: nothing is allocated or run) the
value and gradients of what a distillation step asks of the output heads: the
logits KL against the teacher plus the student's span-corruption cross-entropy,
differentiated with respect to the student's decoder output and head kernel.
Two ways, one JSON line each:

* `formed`: both models form `[batch, targets, vocab]` float32 logits (the head
  matmul), which the chunked losses then read;
* `fused`: the losses get `ProjectedLogits(hidden, kernel)` and form each chunk's
  logits inside their loops (what the training step does).

`temp_mb` is XLA's temporary allocation (`memory_analysis().temp_size_in_bytes`):
the arrays the computation itself creates, not its arguments. `logits_f32_mb`
is one `[batch, targets, vocab]` float32 array, for scale. Runs on any backend
(the numbers are the compiler's, not measured).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from miniend_jax.distill import losses


def temp_bytes(head: str, batch: int, targets: int, student_width: int, teacher_width: int,
               vocab: int, dtype: str, chunk_size: int) -> tuple[int, float]:
  """(temporary bytes, compile seconds) of KL + CE and their gradients."""
  import time  # pylint: disable=import-outside-toplevel
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
  args = (shape(batch, targets, student_width), shape(student_width, vocab),
          shape(batch, targets, teacher_width), shape(teacher_width, vocab),
          jax.ShapeDtypeStruct((batch, targets), jnp.int32),
          jax.ShapeDtypeStruct((batch, targets), jnp.float32))

  def loss(student_h, student_k, teacher_h, teacher_k, target_ids, weights):
    if head == "fused":
      student = losses.ProjectedLogits(student_h, student_k)
      teacher = losses.ProjectedLogits(teacher_h, teacher_k)
    else:  # the model's head: float32 logits accumulated from `dtype` operands
      form = lambda h, k: jnp.einsum("btd,dv->btv", h, k, preferred_element_type=jnp.float32)
      student, teacher = form(student_h, student_k), form(teacher_h, teacher_k)
    kl = losses.logits_kl(teacher, student, weights, chunk_size=chunk_size)
    ce = losses.span_corruption_loss(student, target_ids, weights, chunk_size=chunk_size)
    return kl + ce.total

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--targets", type=int, default=114)
  parser.add_argument("--student_width", type=int, default=384)
  parser.add_argument("--teacher_width", type=int, default=768)
  parser.add_argument("--vocab", type=int, nargs="+", default=[32128, 250112])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--chunk_size", type=int, default=None,
                      help="positions per chunk; default as the training step sizes it "
                      "(losses.chunk_positions for the batch on one device)")
  args = parser.parse_args()
  for vocab in args.vocab:
    chunk = args.chunk_size or losses.chunk_positions(args.batch, vocab, args.targets)
    for head in ("formed", "fused"):
      temp, seconds = temp_bytes(head, args.batch, args.targets, args.student_width,
                                 args.teacher_width, vocab, args.dtype, chunk)
      print(json.dumps(dict(
          benchmark="vocab_loss_memory", head=head, vocab=vocab, batch=args.batch,
          targets=args.targets, dtype=args.dtype, chunk_size=chunk,
          backend=jax.default_backend(), temp_mb=round(temp / 2**20, 1),
          logits_f32_mb=round(args.batch * args.targets * vocab * 4 / 2**20, 1),
          compile_s=round(seconds, 2))), flush=True)


if __name__ == "__main__":
  main()
