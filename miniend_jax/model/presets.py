"""Named T5 sizes: the public checkpoints' shapes and student shapes.

Teacher presets match the Hugging Face configs of the same names. Student
shapes name only what a student changes (depth, width, heads, feed-forward);
vocabulary, feed-forward kind, head tying and relative-position settings come
from the teacher (`student.student_config`).
"""

from __future__ import annotations

import dataclasses

from miniend_jax.model.config import T5Config

_V1_0 = dict(feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=32128)
_V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128)

MODEL_PRESETS: dict[str, T5Config] = {
    # T5 v1.0: https://huggingface.co/google-t5
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, **_V1_0),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, **_V1_0),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, **_V1_0),
    "t5-3b": T5Config(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32, **_V1_0),
    "t5-11b": T5Config(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128, **_V1_0),
    # T5 v1.1 (gated-GELU, untied head, no dropout in pretraining).
    "t5-v1_1-small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, **_V1_1),
    "t5-v1_1-base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, **_V1_1),
    "t5-v1_1-large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, **_V1_1),
    "t5-v1_1-xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, **_V1_1),
    "t5-v1_1-xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, **_V1_1),
    # Small v1.1-style teachers for the offline quickstart and tests (CPU-sized).
    "t5-v1_1-mini": T5Config(d_model=128, d_kv=32, d_ff=384, num_layers=4, num_heads=4, **_V1_1),
    "t5-v1_1-tiny": T5Config(d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4, **_V1_1),
}


@dataclasses.dataclass(frozen=True)
class StudentShape:
  """Depth and width of a student; the paper names them `<layers>L-<d_model>H`."""

  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  num_decoder_layers: int | None = None

  @property
  def d_kv(self) -> int:
    return self.d_model // self.num_heads


STUDENT_SHAPES: dict[str, StudentShape] = {
    # The paper's main student (3.18 GFLOPs vs 25.4 for T5-base); MiniLM's 6x384 has 12 heads.
    "6L-384H": StudentShape(num_layers=6, d_model=384, num_heads=12, d_ff=1536),
    "6L-768H": StudentShape(num_layers=6, d_model=768, num_heads=12, d_ff=3072),
    "4L-512H": StudentShape(num_layers=4, d_model=512, num_heads=8, d_ff=2048),
    "4L-256H": StudentShape(num_layers=4, d_model=256, num_heads=8, d_ff=1024),
    "2L-128H": StudentShape(num_layers=2, d_model=128, num_heads=4, d_ff=512),
    # Tiny shapes for the offline quickstart and tests.
    "2L-64H": StudentShape(num_layers=2, d_model=64, num_heads=4, d_ff=256),
    "1L-32H": StudentShape(num_layers=1, d_model=32, num_heads=4, d_ff=64),
}


def get_model_config(name: str, **overrides) -> T5Config:
  """The preset config called `name` (e.g. "t5-v1_1-base"), with field overrides."""
  if name not in MODEL_PRESETS:
    raise KeyError(f"Unknown model preset {name!r}; known presets: {sorted(MODEL_PRESETS)}.")
  return MODEL_PRESETS[name].replace(**overrides)


def get_student_shape(name: str) -> StudentShape:
  """The student shape called `name` (e.g. "6L-384H")."""
  if name not in STUDENT_SHAPES:
    raise KeyError(f"Unknown student shape {name!r}; known shapes: {sorted(STUDENT_SHAPES)}.")
  return STUDENT_SHAPES[name]
