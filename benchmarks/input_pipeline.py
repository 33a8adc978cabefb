"""Throughput of span corruption + packing on this machine, printed as JSON.

Default: runs the offline pydoc corpus through the full training input
pipeline (tokenization, T5 span corruption, packing with seqio's
encoder-decoder feature converter, batching) and reports examples per second.

  python benchmarks/input_pipeline.py [--inputs_length 512] [--batch_size 32]

`--sources tfrecord,json.gz,parquet` compares corpus file layouts instead: the
same text (the pydoc corpus's train documents, joined into C4-sized documents
and repeated to `--small_mb` and `--scale` x that many MB) is written in each
layout, then each (layout, size) runs in a child process of its own through
the task `--train_files` builds (`tasks.span_corruption_task` over the files,
`tasks.get_dataset` with packing), one pass over the corpus. Per child:
span-corrupted packed input tokens (non-padding `encoder_input_tokens`) and
packed rows per second of process CPU time (user + system of all the
process's threads, `resource.getrusage(RUSAGE_SELF)`: "per core") and per
second of wall time, MB of text per CPU second for reading the files alone
(the source, no preprocessing), and the peak RSS during the pass over the
child's own RSS after its imports and vocabulary load (the peak, VmHWM, is
restarted there, so an import's higher peak cannot hide it; `ru_maxrss` where
it cannot be). The summary takes the rates from the large corpus: the small
one passes too quickly to time.

  python benchmarks/input_pipeline.py --sources tfrecord,json.gz,parquet \
      [--small_mb 4] [--scale 16] [--num_files 8] [--vocabulary DIR_OR_SPM]

Layouts: json.gz as allenai/c4 ships it (one JSON object a line with text,
timestamp, url; gzip), parquet (pyarrow, snappy, `--row_group_rows` rows per
row group; same columns), tfrecord (tf.train.Example with text, timestamp,
url bytes features, as TFDS writes c4).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

SOURCES = ("tfrecord", "json.gz", "parquet")
# allenai/c4 en's documents average ~2.2 KB of text; pydoc documents are joined to about this.
C4_DOC_CHARS = 2200


# ----------------------------------------------------------------------------
# The corpus in each layout


def c4_like_documents(texts, doc_chars: int = C4_DOC_CHARS) -> list[str]:
  """Consecutive texts joined by blank lines into documents of >= `doc_chars`
  characters (the last may be shorter); `doc_chars` 0 keeps them as they are."""
  if not doc_chars:
    return list(texts)
  docs, current = [], []
  for text in texts:
    current.append(text)
    if sum(map(len, current)) + 2 * (len(current) - 1) >= doc_chars:
      docs.append("\n\n".join(current))
      current = []
  if current:
    docs.append("\n\n".join(current))
  return docs


def repeat_to_size(docs: list[str], target_bytes: int) -> list[str]:
  """`docs` cycled until their UTF-8 text holds at least `target_bytes`."""
  out, size = [], 0
  while size < target_bytes:
    for doc in docs:
      out.append(doc)
      size += len(doc.encode("utf-8"))
      if size >= target_bytes:
        break
  return out


def _records(docs: list[str], first: int) -> list[dict]:
  """C4's record layout: text, timestamp, url."""
  return [{"text": d, "timestamp": "2019-04-25T12:57:54Z",
           "url": f"https://example.com/doc/{first + i}"} for i, d in enumerate(docs)]


def write_layout(docs: list[str], directory: str, source: str, num_files: int,
                 row_group_rows: int = 1000) -> str:
  """Writes `docs` in `source`'s layout as `num_files` files; returns their glob pattern."""
  os.makedirs(directory, exist_ok=True)
  per_file = -(-len(docs) // num_files)
  suffix = {"json.gz": ".json.gz", "parquet": ".parquet", "tfrecord": ".tfrecord"}[source]
  for k in range(num_files):
    records = _records(docs[k * per_file:(k + 1) * per_file], k * per_file)
    path = os.path.join(directory, f"c4-train.{k:05d}-of-{num_files:05d}{suffix}")
    if source == "json.gz":
      with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
          f.write(json.dumps(record) + "\n")
    elif source == "parquet":
      import pyarrow as pa  # pylint: disable=import-outside-toplevel
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      table = pa.table({key: [r[key] for r in records] for key in ("text", "timestamp", "url")})
      pq.write_table(table, path, row_group_size=row_group_rows)
    elif source == "tfrecord":
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      with tf.io.TFRecordWriter(path) as writer:
        for record in records:
          feature = {key: tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[value.encode("utf-8")])) for key, value in record.items()}
          writer.write(tf.train.Example(
              features=tf.train.Features(feature=feature)).SerializeToString())
    else:
      raise ValueError(f"Unknown source {source!r}; one of {SOURCES}.")
  return os.path.join(directory, f"c4-train.*{suffix}")


# ----------------------------------------------------------------------------
# One (layout, size) in a child process


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status_mb(key: str) -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _reset_peak_rss() -> bool:
  """Restarts the peak (VmHWM) at the current RSS (Linux >= 4.0), so that the peak of
  what follows is not hidden by a higher one while importing; False where it cannot."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure_files(pattern: str, vocabulary_path: str, inputs_length: int, batch_size: int,
                  warmup_batches: int) -> dict:
  """One pass of the `--train_files` pipeline over `pattern`: rates and peak memory.

  Meant to run alone in its process (peak RSS is the process's)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from miniend_jax.data import tasks  # pylint: disable=import-outside-toplevel
  from miniend_jax.data import vocab  # pylint: disable=import-outside-toplevel

  vocabulary = vocab.get_vocabulary(vocabulary_path)
  vocabulary.vocab_size  # pylint: disable=pointless-statement  # loads the model now
  import_peak_mb = _max_rss_mb()
  peak_reset = _reset_peak_rss()
  baseline_mb = _proc_status_mb("VmRSS") if peak_reset else import_peak_mb
  task = tasks.span_corruption_task("bench_files_span_corruption", vocabulary,
                                    {"train": pattern})
  lengths = tasks.span_corruption_feature_lengths(inputs_length)
  dataset = tasks.get_dataset(task.name, lengths, batch_size=batch_size, shuffle=True, seed=0,
                              shard_info=seqio.ShardInfo(0, 1), pack=True, num_epochs=1)
  start_wall = time.perf_counter()
  iterator = dataset.as_numpy_iterator()
  for _ in range(warmup_batches):
    if next(iterator, None) is None:
      raise SystemExit(f"{pattern} gives fewer than {warmup_batches + 1} batches of "
                       f"{batch_size}: raise --small_mb.")
  first_batches_s = time.perf_counter() - start_wall
  rows = tokens = target_tokens = 0
  wall, cpu = time.perf_counter(), _cpu_seconds()
  peak_mb = lambda: _proc_status_mb("VmHWM") if peak_reset else _max_rss_mb()
  peaks = []  # the peak so far, every 20 batches: flat memory levels off early
  for i, batch in enumerate(iterator):
    rows += batch["encoder_input_tokens"].shape[0]
    tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    target_tokens += int(np.count_nonzero(batch["decoder_target_tokens"]))
    if i % 20 == 0:
      peaks.append(peak_mb())
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  pipeline_peak_mb = peak_mb()
  peaks.append(pipeline_peak_mb)

  # The files alone: the source's examples counted inside tf.data (no Python per
  # example), no tokenizing: what reading and parsing the layout costs.
  read_wall, read_cpu = time.perf_counter(), _cpu_seconds()
  documents, text_bytes = (int(x) for x in task.source.get_dataset("train", shuffle=False).reduce(
      (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
      lambda acc, ex: (acc[0] + 1, acc[1] + tf.cast(tf.strings.length(ex["text"]), tf.int64))))
  read_wall, read_cpu = time.perf_counter() - read_wall, _cpu_seconds() - read_cpu
  return {
      "pattern": pattern,
      "documents": documents,
      "text_mb": round(text_bytes / 2**20, 2),
      "mean_document_bytes": round(text_bytes / max(documents, 1)),
      "timed_rows": rows,
      "timed_input_tokens": tokens,
      "encoder_fill": round(tokens / max(rows * inputs_length, 1), 4),
      "input_tokens_per_cpu_second": round(tokens / cpu, 1),
      "input_tokens_per_wall_second": round(tokens / wall, 1),
      "target_tokens_per_cpu_second": round(target_tokens / cpu, 1),
      "rows_per_cpu_second": round(rows / cpu, 2),
      "cpu_per_wall": round(cpu / wall, 2),
      "read_only_mb_per_cpu_second": round(text_bytes / 2**20 / read_cpu, 2),
      "read_only_mb_per_wall_second": round(text_bytes / 2**20 / read_wall, 2),
      "timed_cpu_seconds": round(cpu, 2),
      "timed_wall_seconds": round(wall, 2),
      "first_batches_seconds": round(first_batches_s, 2),
      "baseline_rss_mb": round(baseline_mb, 1),
      "peak_rss_over_baseline_mb": round(pipeline_peak_mb - baseline_mb, 1),
      "peak_rss_over_baseline_mb_at_quarters": [
          round(peaks[(len(peaks) - 1) * q // 4] - baseline_mb, 1)
          for q in (1, 2, 3, 4)],
      "peak_from": "VmHWM reset after imports" if peak_reset else "ru_maxrss",
      "import_ru_maxrss_mb": round(import_peak_mb, 1),
  }


def _measure_in_child(args, source: str, size: str, pattern: str, vocabulary_path: str) -> dict:
  request = {"pattern": pattern, "vocabulary_path": vocabulary_path,
             "inputs_length": args.inputs_length, "batch_size": args.batch_size,
             "warmup_batches": args.warmup_batches}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure_child",
                         json.dumps(request)], capture_output=True, text=True, check=False)
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise SystemExit(f"{source} {size}: the measuring child exited with {proc.returncode}: "
                     f"{last}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"source": source, "corpus": size, **result}


def _summary(runs: list[dict], sizes: list[str]) -> dict:
  """Per source: the rates of the largest corpus (the small one passes too quickly to
  time) and the peak memory of every size, side by side."""
  summary = {}
  for run in runs:
    entry = summary.setdefault(run["source"], {})
    if run["corpus"] == sizes[-1]:
      for key in ("input_tokens_per_cpu_second", "rows_per_cpu_second", "cpu_per_wall",
                  "read_only_mb_per_cpu_second"):
        entry[key] = run[key]
    entry[f"peak_rss_over_baseline_mb_{run['corpus']}"] = run["peak_rss_over_baseline_mb"]
    if run["corpus"] == sizes[-1]:
      entry[f"peak_rss_over_baseline_mb_{run['corpus']}_at_quarters"] = run[
          "peak_rss_over_baseline_mb_at_quarters"]
  return summary


def compare_sources(args) -> dict:
  """Writes the corpus in each layout at two sizes and measures each in its own child."""
  from miniend_jax.data import local_corpus  # pylint: disable=import-outside-toplevel
  from miniend_jax.data import tasks  # pylint: disable=import-outside-toplevel

  sources = [s.strip() for s in args.sources.split(",") if s.strip()]
  unknown = [s for s in sources if s not in SOURCES]
  if unknown:
    raise SystemExit(f"--sources: unknown {unknown}; choose from {','.join(SOURCES)}.")
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = args.work_dir or tmp
    vocab_size = args.vocab_size or local_corpus.DEFAULT_VOCAB_SIZE
    vocabulary, data_dir = local_corpus.setup_pydoc_tasks(work_dir, vocab_size=vocab_size)
    vocabulary_path = args.vocabulary or vocabulary.sentencepiece_model_file
    texts = tasks.read_jsonl_files(
        [local_corpus.corpus_file(data_dir, local_corpus.TASK_SPAN_CORRUPTION, "train")],
        ["text"])["text"]
    docs = c4_like_documents(texts, args.doc_chars)
    sizes = {"small": args.small_mb, f"{args.scale}x": args.small_mb * args.scale}
    runs, write_seconds = [], {}
    for size, megabytes in sizes.items():
      corpus = repeat_to_size(docs, int(megabytes * 2**20))
      for source in sources:
        start = time.perf_counter()
        pattern = write_layout(corpus, os.path.join(tmp, "corpora", size, source), source,
                               args.num_files, args.row_group_rows)
        write_seconds[f"{source}/{size}"] = round(time.perf_counter() - start, 1)
        runs.append(_measure_in_child(args, source, size, pattern, vocabulary_path))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)

  result = {
      "benchmark": "span_corruption_by_source",
      "rates_per_cpu_second": "process CPU time (user + system, all threads; getrusage)",
      "peak_rss": "each child's peak RSS during the pass (VmHWM, restarted after its "
                  "imports + vocabulary) minus its RSS then",
      "summary": _summary(runs, list(sizes)),
      "inputs_length": args.inputs_length,
      "batch_size": args.batch_size,
      "doc_chars": args.doc_chars,
      "num_files": args.num_files,
      "row_group_rows": args.row_group_rows,
      "corpus_mb": sizes,
      "vocabulary": args.vocabulary or f"pydoc {vocab_size} pieces",
      "runs": runs,
      "write_seconds": write_seconds,
      "cpu_count": os.cpu_count(),
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "python": platform.python_version(),
  }
  print(json.dumps(result, indent=1))
  return result


# ----------------------------------------------------------------------------
# The pydoc task (the default benchmark)


def pydoc_task(args) -> dict:
  """The embedded pydoc corpus's task through the pipeline, `num_batches` batches."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from miniend_jax.data import local_corpus  # pylint: disable=import-outside-toplevel
  from miniend_jax.data import tasks  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    work_dir = args.work_dir or tmp
    start = time.perf_counter()
    local_corpus.setup_pydoc_tasks(
        work_dir, vocab_size=args.vocab_size or local_corpus.DEFAULT_VOCAB_SIZE)
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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work_dir", default=None,
                      help="corpus/vocabulary cache (default: a temp dir)")
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--warmup_batches", type=int, default=5)
  parser.add_argument("--num_batches", type=int, default=200,
                      help="timed batches of the pydoc task (not with --sources: one pass)")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="pieces of the pydoc vocabulary trained on the corpus "
                      "(default local_corpus.DEFAULT_VOCAB_SIZE)")
  parser.add_argument("--sources", default=None,
                      help=f"compare layouts of the same text, e.g. {','.join(SOURCES)}")
  parser.add_argument("--vocabulary", default=None,
                      help="with --sources: a SentencePiece model (file or directory) to "
                      "tokenize with instead of the pydoc one, e.g. T5's spiece.model")
  parser.add_argument("--small_mb", type=float, default=4.0,
                      help="with --sources: text MB of the small corpus")
  parser.add_argument("--scale", type=int, default=16,
                      help="with --sources: the large corpus is this many times the small")
  parser.add_argument("--num_files", type=int, default=8,
                      help="with --sources: files per layout")
  parser.add_argument("--doc_chars", type=int, default=C4_DOC_CHARS,
                      help="with --sources: join pydoc texts into documents of about this "
                      "many characters (C4's mean); 0 keeps them as they are")
  parser.add_argument("--row_group_rows", type=int, default=1000,
                      help="with --sources: parquet rows per row group")
  parser.add_argument("--measure_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.measure_child:
    result = measure_files(**json.loads(args.measure_child))
    print(json.dumps(result))
    return result
  if args.sources:
    return compare_sources(args)
  return pydoc_task(args)


if __name__ == "__main__":
  main()
