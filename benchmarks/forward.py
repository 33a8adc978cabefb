"""Forward-pass throughput: our jitted Flax T5 against Hugging Face's PyTorch T5.

Same shapes, same (random) weights, one process, printed as one JSON line:

  python benchmarks/forward.py --model t5-v1_1-base --batch 8 --inputs 128 --targets 32

Imports neither seqio nor TensorFlow, so it runs on accelerator images that lack them.
torch is optional: without it only our side is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from miniend_jax.model import presets
from miniend_jax.model.t5 import T5, init_params


def _time(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def bench_jax(config, params, enc, dec, steps):
  forward = jax.jit(lambda p, e, d: T5(config).apply({"params": p}, e, d).logits)
  start = time.perf_counter()
  forward(params, enc, dec).block_until_ready()
  compile_s = time.perf_counter() - start
  times = _time(lambda: forward(params, enc, dec).block_until_ready(), steps)
  return compile_s, statistics.median(times)


def bench_torch(config, params, enc, dec, steps, dtype):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(config, params, d)
    model = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  model = model.to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
  enc_t = torch.as_tensor(np.asarray(enc), dtype=torch.long)
  dec_t = torch.as_tensor(np.asarray(dec), dtype=torch.long)
  mask = (enc_t != 0).long()
  def run():
    with torch.inference_mode():
      model(input_ids=enc_t, attention_mask=mask, decoder_input_ids=dec_t).logits.sum().item()
  run()
  return statistics.median(_time(run, steps)), torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="t5-v1_1-base")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--impl", default="both", choices=["both", "jax", "torch"])
  args = parser.parse_args()

  config = presets.get_model_config(args.model, dtype=args.dtype, dropout_rate=0.0)
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(2, config.vocab_size, (args.batch, args.inputs)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, config.vocab_size, (args.batch, args.targets)), jnp.int32)
  tokens = args.batch * (args.inputs + args.targets)
  result = dict(benchmark="forward", model=args.model, batch=args.batch, inputs=args.inputs,
                targets=args.targets, dtype=args.dtype, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind))
  if args.impl in ("both", "jax"):
    # Stored in the compute dtype, as the torch model is after .to(dtype) (and as
    # a distillation run stores its frozen teacher).
    stored = jax.tree.map(lambda x: x.astype(args.dtype), params)
    compile_s, step_s = bench_jax(config, stored, enc, dec, args.steps)
    result.update(jax_compile_s=round(compile_s, 3), jax_step_s=round(step_s, 4),
                  jax_tokens_per_s=round(tokens / step_s, 1))
  if args.impl in ("both", "torch"):
    try:
      torch_s, threads = bench_torch(config, params, enc, dec, args.steps, args.dtype)
      result.update(torch_step_s=round(torch_s, 4), torch_tokens_per_s=round(tokens / torch_s, 1),
                    torch_threads=threads)
    except ImportError as e:
      result.update(torch_error=f"torch/transformers unavailable: {e}")
  if "jax_step_s" in result and "torch_step_s" in result:
    result["speedup_jax_over_torch"] = round(result["torch_step_s"] / result["jax_step_s"], 3)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
