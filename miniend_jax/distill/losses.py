"""Pure distillation losses: arrays in, float32 scalar out.

They live in one module per family: `relations` (MiniLMv2 relations,
attention KL), `logits` (chunked logit KL and span-corruption cross-entropy
over `ProjectedLogits`), `hidden` (TinyBERT hidden-state MSE); the
conventions they share (float32, stop-gradient teachers, masks,
interpolated targets) are described in `common`.
"""

# Re-exported: users import these from here (`losses.logits_kl`, ...).
from miniend_jax.distill.hidden import hidden_mse
from miniend_jax.distill.logits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_SIZE,
    CrossEntropy,
    ProjectedLogits,
    chunk_positions,
    logits_kl,
    span_corruption_loss,
)
from miniend_jax.distill.relations import attention_kl, relation_kl, relation_scores

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_CHUNK_SIZE", "CrossEntropy", "ProjectedLogits",
    "attention_kl", "chunk_positions", "hidden_mse", "logits_kl", "relation_kl",
    "relation_scores", "span_corruption_loss",
]
