"""Throughput of span corruption + packing on this machine, printed as JSON.

Runs the offline pydoc corpus through the full training input pipeline
(tokenization, T5 span corruption, packing with seqio's encoder-decoder
feature converter, batching) and reports examples per second.

  python benchmarks/input_pipeline.py [--inputs_length 512] [--batch_size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import seqio
import tensorflow as tf

from miniend_jax.data import local_corpus
from miniend_jax.data import tasks


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--work_dir", default=None,
                      help="corpus/vocabulary cache (default: a temp dir)")
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--warmup_batches", type=int, default=5)
  parser.add_argument("--num_batches", type=int, default=200)
  parser.add_argument("--vocab_size", type=int,
                      default=local_corpus.DEFAULT_VOCAB_SIZE)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    work_dir = args.work_dir or tmp
    start = time.perf_counter()
    local_corpus.setup_pydoc_tasks(work_dir, vocab_size=args.vocab_size)
    setup_s = time.perf_counter() - start

    lengths = tasks.span_corruption_feature_lengths(args.inputs_length)
    start = time.perf_counter()
    dataset = tasks.get_dataset(
        "pydoc_span_corruption", lengths, batch_size=args.batch_size,
        shuffle=True, seed=0, shard_info=seqio.ShardInfo(0, 1), pack=True)
    iterator = iter(dataset)
    for _ in range(args.warmup_batches):
      next(iterator)
    first_batches_s = time.perf_counter() - start

    rows = examples = tokens = 0
    start = time.perf_counter()
    for _ in range(args.num_batches):
      batch = tf.nest.map_structure(lambda t: t.numpy(), next(iterator))
      rows += batch["encoder_input_tokens"].shape[0]
      # Packed span-corruption examples: the segments of each row.
      examples += int(batch["encoder_segment_ids"].max(axis=1).sum())
      tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    elapsed = time.perf_counter() - start

  result = {
      "benchmark": "span_corruption_packing_input_pipeline",
      "task": "pydoc_span_corruption",
      "task_feature_lengths": lengths,
      "batch_size": args.batch_size,
      "num_batches": args.num_batches,
      "examples_per_second": round(examples / elapsed, 1),
      "packed_rows_per_second": round(rows / elapsed, 1),
      "encoder_tokens_per_second": round(tokens / elapsed, 1),
      "encoder_fill": round(tokens / (rows * lengths["inputs"]), 4),
      "seconds_timed": round(elapsed, 3),
      "setup_seconds": round(setup_s, 2),
      "first_batches_seconds": round(first_batches_s, 2),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
  }
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
