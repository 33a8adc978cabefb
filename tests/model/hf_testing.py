"""Tiny real Hugging Face T5 checkpoints written by the tests (no hub access)."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def make_hf_model(*, family: str = "v1_0", seed: int = 0, vocab_size: int = 97, d_model: int = 32,
                  d_kv: int = 8, d_ff: int = 48, num_layers: int = 2, num_decoder_layers: int = 3,
                  num_heads: int = 4, num_buckets: int = 32, max_distance: int = 128
                  ) -> transformers.T5ForConditionalGeneration:
  """A randomly initialised torch T5 of the given family, in eval mode.

  v1_0: ReLU, tied and rescaled head. v1_1: gated-GELU, separate head.
  Weights are perturbed away from HF's init so that layer norms and the
  relative bias are not trivially ones / tiny.
  """
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
      num_decoder_layers=num_decoder_layers, num_heads=num_heads,
      relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
      feed_forward_proj="relu" if family == "v1_0" else "gated-gelu",
      tie_word_embeddings=(family == "v1_0"), dropout_rate=0.1)
  return perturb(transformers.T5ForConditionalGeneration(config), untied_head=family == "v1_1")


_CLASSES = {
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
    "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
    "umt5": (transformers.UMT5Config, transformers.UMT5ForConditionalGeneration),
}


def make_model(model_type: str, *, seed: int = 0, tie_word_embeddings: bool = False,
               **fields) -> transformers.PreTrainedModel:
  """A random transformers model of `model_type`, weights perturbed away from init."""
  config_cls, model_cls = _CLASSES[model_type]
  fields = dict(dict(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                     num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=16,
                     relative_attention_max_distance=40, dropout_rate=0.0), **fields)
  torch.manual_seed(seed)
  return perturb(model_cls(config_cls(tie_word_embeddings=tie_word_embeddings, **fields)),
                 untied_head=not tie_word_embeddings)


def perturb(model: transformers.PreTrainedModel, *, untied_head: bool):
  """`model` (a T5-family model, fresh from its constructor) in eval mode with
  layer norms and relative-position tables moved away from their trivial init
  and, with `untied_head`, an output head of its own."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
    if untied_head:
      vocab_size, d_model = model.shared.weight.shape
      model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, d_model) * d_model ** -0.5)
  return model.eval()


def padded_batch(rng: np.random.Generator, vocab_size: int, batch: int, input_len: int,
                 target_len: int):
  """Random token batch with ragged padding (id 0) at the ends; targets shifted right."""
  enc = rng.integers(2, vocab_size, size=(batch, input_len))
  targets = rng.integers(2, vocab_size, size=(batch, target_len))
  for b in range(batch):
    enc[b, rng.integers(input_len // 2, input_len + 1):] = 0
    targets[b, rng.integers(target_len // 2, target_len + 1):] = 0
  enc[0, :] = np.where(enc[0] == 0, 3, enc[0])  # one row without padding
  dec_in = np.concatenate([np.zeros((batch, 1), np.int64), targets[:, :-1]], axis=1)
  return enc.astype(np.int32), dec_in.astype(np.int32), targets.astype(np.int32)


def hf_logits(model, enc, dec_in) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                attention_mask=torch.as_tensor(enc != 0, dtype=torch.long),
                decoder_input_ids=torch.as_tensor(dec_in, dtype=torch.long))
  return out.logits.float().numpy()


def rel_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
