"""Our T5 against Hugging Face's PyTorch T5 on this machine's accelerator.

  python benchmarks/hf_parity.py [--models t5-small,t5-v1_1-small] [--batch 4]

For each model (one per family: v1.0 ReLU with a tied head, v1.1 gated-GELU
with its own head) the same random weights (ours, written with `save_hf`) run
in both, float32, on a padded random batch; one JSON line per model gives the
logits' relative error max|ours - hf| / max|hf| and where each ran. Both sides
use full float32 matmuls (no TF32), so the figure checks the model, not the
kernels' precision. The test suite checks the same relation on the CPU with
tiny configs; this runs it on the GPU at real widths.

Imports neither seqio nor TensorFlow (accelerator images lack them).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import numpy as np

from miniend_jax.model import hf, presets
from miniend_jax.model.t5 import T5, init_params


def _batch(rng, vocab: int, batch: int, inputs: int, targets: int):
  """Ragged padding (id 0) at the row ends; decoder inputs = targets shifted right."""
  enc = rng.integers(2, vocab, size=(batch, inputs))
  tgt = rng.integers(2, vocab, size=(batch, targets))
  for row in range(1, batch):
    enc[row, rng.integers(inputs // 2, inputs):] = 0
  dec = np.concatenate([np.zeros((batch, 1), np.int64), tgt[:, :-1]], axis=1)
  return enc.astype(np.int32), dec.astype(np.int32)


# --tiny: each family's own layout at a width the CPU runs in seconds.
TINY = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


def compare(model_name: str, batch: int, inputs: int, targets: int, seed: int = 0,
            tiny: bool = False) -> dict:
  """One JSON-able record: our and Hugging Face's float32 logits on the same weights."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  config = presets.get_model_config(model_name, dropout_rate=0.0, dtype="float32",
                                    **(TINY if tiny else {}))
  params = init_params(config, jax.random.key(seed))
  enc, dec = _batch(np.random.default_rng(seed), config.vocab_size, batch, inputs, targets)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(lambda p: T5(config).apply({"params": p}, enc, dec).logits)(params))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with tempfile.TemporaryDirectory() as directory:
    hf.save_hf(config, params, directory)
    model = transformers.T5ForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32).to(device).eval()
  with torch.inference_mode():
    theirs = model(input_ids=torch.as_tensor(enc, dtype=torch.long, device=device),
                   attention_mask=torch.as_tensor(enc != 0, dtype=torch.long, device=device),
                   decoder_input_ids=torch.as_tensor(dec, dtype=torch.long, device=device)
                   ).logits.float().cpu().numpy()
  rel_error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  return dict(benchmark="hf_parity", model=model_name + (" (tiny)" if tiny else ""),
              family=config.feed_forward_proj,
              batch=batch, inputs=inputs, targets=targets, logits_rel_error=rel_error,
              jax_device=str(jax.devices()[0].device_kind), torch_device=device)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="t5-small,t5-v1_1-small",
                      help="comma-separated presets (one per family by default)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=32)
  parser.add_argument("--tiny", action="store_true",
                      help="each family at a tiny width (a CPU smoke run)")
  args = parser.parse_args()
  for name in args.models.split(","):
    print(json.dumps(compare(name, args.batch, args.inputs, args.targets, tiny=args.tiny)),
          flush=True)


if __name__ == "__main__":
  main()
