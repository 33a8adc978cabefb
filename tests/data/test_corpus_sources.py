"""Streaming corpus sources (data/sources.py) and the Hub's parquet layouts
(data/hub_parquet.py): formats, disjoint shards, exact resume, bad records,
and the same text as the TFDS path."""

import collections
import gzip
import importlib.util
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from miniend_jax.data import hub_parquet, sources, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docs(file_index, count):
  return [f"file {file_index} doc {i}: " + "words go here " * (i % 4 + 1) for i in range(count)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """The same 3 x 300 documents as json.gz, jsonl, txt.gz and parquet (2 row groups)."""
  root = tmp_path_factory.mktemp("corpora")
  layouts = {}
  for fmt, suffix in (("jsongz", ".json.gz"), ("jsonl", ".jsonl"), ("txtgz", ".txt.gz"),
                      ("parquet", ".parquet")):
    (root / fmt).mkdir()
    for k in range(3):
      docs, path = _docs(k, 300), root / fmt / f"part-{k}{suffix}"
      if fmt == "parquet":
        pq.write_table(pa.table({"text": docs, "url": ["u"] * 300}), path, row_group_size=128)
      else:
        lines = docs if fmt == "txtgz" else [json.dumps({"text": d, "url": "u"}) for d in docs]
        data = ("\n".join(lines) + "\n").encode()
        path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    layouts[fmt] = str(root / fmt / "part-*")
  return layouts


def _texts(ds):
  return [x["text"].decode() for x in ds.as_numpy_iterator()]


@pytest.mark.parametrize("fmt", ["jsongz", "jsonl", "txtgz", "parquet"])
def test_every_format_reads_every_record_in_file_order(corpora, fmt):
  source = sources.FileSource({"train": corpora[fmt]}, chunk_records=50)
  assert _texts(source.get_dataset("train", shuffle=False)) == sum(
      (_docs(k, 300) for k in range(3)), [])


@pytest.mark.parametrize("num_shards", [2, 5])  # more and fewer shards than files
def test_shards_are_disjoint_and_cover_whatever_their_seeds(corpora, num_shards):
  source = sources.FileSource({"train": corpora["jsongz"]}, chunk_records=64)
  # As train/inputs.py reads them: shuffled, each shard with a seed of its own.
  shards = [_texts(source.get_dataset("train", shuffle=True, seed=100 + s,
                                      shard_info=seqio.ShardInfo(s, num_shards)))
            for s in range(num_shards)]
  assert collections.Counter(sum(shards, [])) == collections.Counter(
      sum((_docs(k, 300) for k in range(3)), []))


def test_jsonl_source_shards_are_disjoint_with_fewer_files_than_shards(tmp_path):
  # Issue 19 item 8: each shard shuffled the file list with its own seed, then
  # seqio sharded by example: shards overlapped.
  # Files whose lengths are not multiples of the shard count: another file
  # order then moves every example to another shard.
  for k in range(3):
    (tmp_path / f"p{k}.jsonl").write_text("\n".join(json.dumps({"text": d})
                                                    for d in _docs(k, 41 + 2 * k)))
  task = seqio.Task("test_jsonl_shards", tasks.JsonlDataSource({"train": str(tmp_path / "*")}),
                    output_features={}, preprocessors=[])
  shards = [[x["text"] for x in task.get_dataset(
      None, "train", shuffle=True, seed=7 + s, shard_info=seqio.ShardInfo(s, 4),
      shuffle_buffer_size=1).as_numpy_iterator()] for s in range(4)]
  assert collections.Counter(sum(shards, [])) == collections.Counter(
      d.encode() for k in range(3) for d in _docs(k, 41 + 2 * k))


def test_a_restored_iterator_continues_mid_file_exactly(corpora, tmp_path):
  source = sources.FileSource({"train": corpora["jsongz"]}, chunk_records=32)
  ds = source.get_dataset("train", shuffle=True, seed=3).shuffle(40, seed=1).repeat().prefetch(3)
  iterator = tasks.DatasetIterator(ds.batch(4))
  for _ in range(60):  # 240 records: inside the first file
    next(iterator)
  iterator.save(str(tmp_path), "pos")
  expected = [next(iterator)["text"].tolist() for _ in range(200)]  # across files and epochs
  restored = tasks.DatasetIterator(ds.batch(4)).restore(str(tmp_path), "pos")
  assert [next(restored)["text"].tolist() for _ in range(200)] == expected


def test_bad_records_name_file_and_record_or_are_skipped_and_counted(tmp_path):
  good = [json.dumps({"text": f"fine {i}"}) for i in range(20)]
  (tmp_path / "a.jsonl").write_text("\n".join(good[:5] + ["{not json"] + good[5:]))
  (tmp_path / "b.jsonl").write_text("\n".join(good[:3] + ['{"body": "x"}']))
  whole = gzip.compress(("\n".join(good * 50) + "\n").encode())
  (tmp_path / "c.json.gz").write_bytes(whole[:len(whole) // 2])
  for name, where in (("a.jsonl", "a.jsonl:6: is not valid JSON"),
                      ("b.jsonl", "b.jsonl:4: has no string field 'text'"),
                      ("c.json.gz", "c.json.gz:\\d+: cannot be read .*truncated")):
    iterator = tasks.DatasetIterator(sources.FileSource(
        {"train": str(tmp_path / name)}).get_dataset("train", shuffle=False))
    with pytest.raises(sources.BadRecordError, match=where):
      list(iterator)
  before = sources.skipped_records()
  skipping = sources.FileSource({"train": str(tmp_path / "*")}, skip_bad_records=True)
  texts = _texts(skipping.get_dataset("train", shuffle=False))
  assert sources.skipped_records() - before == 3
  assert texts[:23] == [f"fine {i}" for i in range(20)] + ["fine 0", "fine 1", "fine 2"]
  # The start-up check reads the first records only: a bad line further on passes it.
  assert sources.check_files({"train": str(tmp_path / "a.jsonl")}, records_to_check=5)


def _write_hub_parquet(root, repo_config_split, rows):
  path = root / f"{repo_config_split}-00000-of-00001.parquet"
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def test_hub_parquet_tasks_give_the_tfds_text(tfds_tasks, tmp_path):
  # The same examples through TFDS (mock data) and through the Hub's parquet
  # layout with its column names: the same inputs and targets strings.
  names = {"glue_rte": ("glue/rte", "nyu-mll/glue/rte/validation"),
           "glue_stsb": ("glue/stsb", "nyu-mll/glue/stsb/validation"),
           "glue_mnli": ("glue/mnli", "nyu-mll/glue/mnli/validation_matched"),
           "cnn_dailymail": ("cnn_dailymail", "abisee/cnn_dailymail/3.0.0/validation"),
           "xsum": ("xsum", "xsum/validation")}  # a short directory name works too

  def strings(task_name):
    ds = seqio.get_mixture_or_task(task_name).get_dataset(None, "validation", shuffle=False)
    return [(x["inputs_pretokenized"], x["targets_pretokenized"])
            for x in ds.take(12).as_numpy_iterator()]

  with tfds.testing.mock_data(num_examples=12):
    expected = {name: strings(name) for name in names}
    for name, (tfds_name, layout) in names.items():
      split = "validation_matched" if name == "glue_mnli" else "validation"
      rows = [{k: (v.decode() if isinstance(v, bytes) else v.item()) for k, v in x.items()}
              for x in tfds.as_numpy(tfds.load(tfds_name, split=split, shuffle_files=False))]
      if name == "cnn_dailymail":
        rows = [{"article": r["article"], "highlights": r["highlights"], "id": "x"} for r in rows]
      _write_hub_parquet(tmp_path, layout, rows)
  hub_parquet.register_hub_tasks(str(tmp_path))
  for name in names:
    assert strings(name) == expected[name], name
  assert all(isinstance(t.source, sources.FileSource)
             for t in seqio.get_mixture_or_task("glue").tasks)


def test_benchmark_layouts_hold_the_same_records(tmp_path):
  # benchmarks/input_pipeline.py --sources compares layouts of one text: each must
  # read back, through the sources `--train_files` uses, as exactly that text.
  spec = importlib.util.spec_from_file_location(
      "input_pipeline_bench", os.path.join(ROOT, "benchmarks", "input_pipeline.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  docs = bench.repeat_to_size(bench.c4_like_documents(
      ["Ünïcode line\nand a second", "short", "x" * 50, "tail"], doc_chars=20), 400)
  assert len(docs) > 10 and sum(len(d) for d in docs) >= 400
  for layout in bench.SOURCES:
    pattern = bench.write_layout(docs, str(tmp_path / layout), layout, num_files=3,
                                 row_group_rows=4)
    assert len(sources.list_files(pattern)) == 3
    records = sources.FileSource({"train": pattern}, fields=("text", "url")).get_dataset(
        "train", shuffle=False).as_numpy_iterator()
    assert [(r["text"].decode(), r["url"].decode()) for r in records] == [
        (d, f"https://example.com/doc/{i}") for i, d in enumerate(docs)], layout
