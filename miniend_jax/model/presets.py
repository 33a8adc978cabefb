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
_MT5 = dict(_V1_1, vocab_size=250112)
_UMT5 = dict(_V1_1, vocab_size=256384, relative_bias_per_layer=True)
_BYT5 = dict(_V1_1, vocab_size=384)

# The T5 v1.1 sizes, which Flan-T5, mT5 and umT5 share (they differ in vocabulary
# and relative positions).
_V1_1_SHAPES = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


def _v1_1_sizes(prefix: str, family: dict, sizes=tuple(_V1_1_SHAPES)) -> dict[str, T5Config]:
  """{"<prefix>-<size>": config} of a family built on the T5 v1.1 shapes."""
  return {f"{prefix}-{size}": T5Config(**_V1_1_SHAPES[size], **family) for size in sizes}


MODEL_PRESETS: dict[str, T5Config] = {
    # T5 v1.0: https://huggingface.co/google-t5
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, **_V1_0),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, **_V1_0),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, **_V1_0),
    "t5-3b": T5Config(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32, **_V1_0),
    "t5-11b": T5Config(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128, **_V1_0),
    # T5 v1.1 (gated-GELU, untied head, no dropout in pretraining).
    **_v1_1_sizes("t5-v1_1", _V1_1),
    # Flan-T5: T5 v1.1 shapes, instruction-finetuned. https://huggingface.co/google/flan-t5-base
    **_v1_1_sizes("flan-t5", _V1_1),
    # mT5: v1.1 layout, 250k SentencePiece vocabulary. https://huggingface.co/google/mt5-base
    **_v1_1_sizes("mt5", _MT5),
    # umT5: mT5 shapes, per-layer relative positions, 256k vocabulary (no large).
    # https://huggingface.co/google/umt5-base
    **_v1_1_sizes("umt5", _UMT5, ("small", "base", "xl", "xxl")),
    # ByT5: bytes (384 ids), deep encoder, shallow decoder. https://huggingface.co/google/byt5-base
    "byt5-small": T5Config(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_decoder_layers=4,
                           num_heads=6, **_BYT5),
    "byt5-base": T5Config(d_model=1536, d_kv=64, d_ff=3968, num_layers=18, num_decoder_layers=6,
                          num_heads=12, **_BYT5),
    "byt5-large": T5Config(d_model=1536, d_kv=64, d_ff=3840, num_layers=36, num_decoder_layers=12,
                           num_heads=16, **_BYT5),
    "byt5-xl": T5Config(d_model=2560, d_kv=64, d_ff=6720, num_layers=36, num_decoder_layers=12,
                        num_heads=32, **_BYT5),
    "byt5-xxl": T5Config(d_model=4672, d_kv=64, d_ff=12352, num_layers=36, num_decoder_layers=12,
                         num_heads=64, **_BYT5),
    # UL2 20B (and Flan-UL2): gated-SiLU, 32+32 layers. https://huggingface.co/google/ul2
    "ul2": T5Config(d_model=4096, d_kv=256, d_ff=16384, num_layers=32, num_heads=16,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False, vocab_size=32128),
    # Small v1.1-style teachers for the offline quickstart and tests (CPU-sized).
    "t5-v1_1-mini": T5Config(d_model=128, d_kv=32, d_ff=384, num_layers=4, num_heads=4, **_V1_1),
    "t5-v1_1-tiny": T5Config(d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4, **_V1_1),
}


@dataclasses.dataclass(frozen=True)
class StudentShape:
  """Depth and width of a student; the paper names them `<layers>L-<d_model>H`
  (`<encoder>+<decoder>L-<d_model>H` when the depths differ). A student keeps
  its teacher's vocabulary and family: with mT5 / umT5's 250k vocabulary the
  embeddings hold most of a small student's parameters. `d_ff` None takes the
  teacher's d_ff / d_model ratio (`student.student_config`)."""

  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int | None = None
  num_decoder_layers: int | None = None

  @property
  def d_kv(self) -> int:
    return self.d_model // self.num_heads


STUDENT_SHAPES: dict[str, StudentShape] = {
    # The paper's main student (3.18 GFLOPs vs 25.4 for T5-base); MiniLM's 6x384 has 12 heads.
    # Feed-forward widths follow the teacher: 6L-384H has d_ff 1024 under T5 v1.1-base
    # (gated-GELU, 2048 / 768), 1536 under T5 v1.0-base (ReLU, 3072 / 768).
    "6L-384H": StudentShape(num_layers=6, d_model=384, num_heads=12),
    "6L-768H": StudentShape(num_layers=6, d_model=768, num_heads=12),
    "4L-512H": StudentShape(num_layers=4, d_model=512, num_heads=8),
    "4L-256H": StudentShape(num_layers=4, d_model=256, num_heads=8),
    "2L-128H": StudentShape(num_layers=2, d_model=128, num_heads=4),
    # ByT5's 3:1 encoder:decoder depth (bytes make long inputs, short outputs).
    "9+3L-768H": StudentShape(num_layers=9, num_decoder_layers=3, d_model=768, num_heads=12),
    "6+2L-512H": StudentShape(num_layers=6, num_decoder_layers=2, d_model=512, num_heads=8),
    # Tiny shapes for the offline quickstart and tests.
    "2L-64H": StudentShape(num_layers=2, d_model=64, num_heads=4),
    "1L-32H": StudentShape(num_layers=1, d_model=32, num_heads=4),
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
