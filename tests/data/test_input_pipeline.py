"""Host sharding, determinism and resuming of the input pipeline."""

import collections
import json

import numpy as np
import pytest
import seqio

from miniend_jax.data import tasks

LENGTHS = {"inputs": 64, "targets": 16}


def _rows(name, split, shard_info, **kwargs):
  ds = tasks.get_dataset(name, LENGTHS, split=split, shard_info=shard_info,
                         num_epochs=1, shuffle=False, pack=False, **kwargs)
  return [tuple(x["encoder_input_tokens"]) + tuple(x["decoder_target_tokens"])
          for x in ds.as_numpy_iterator()]


def test_host_shards_are_disjoint_and_cover_the_data(pydoc_setup):
  # One JSONL file per split: seqio shards at the example level.
  everything = _rows("pydoc_topic", "validation", seqio.ShardInfo(0, 1))
  assert len(everything) == len(set(everything)) > 100
  shards = [_rows("pydoc_topic", "validation", seqio.ShardInfo(i, 3))
            for i in range(3)]
  for i in range(3):
    for j in range(i + 1, 3):
      assert not set(shards[i]) & set(shards[j])
  assert collections.Counter(sum(shards, [])) == collections.Counter(everything)
  # The default shard is this process's (one process here: everything).
  assert tasks.host_shard_info() == seqio.ShardInfo(0, 1)
  assert _rows("pydoc_topic", "validation", None) == everything


def test_file_level_shards_are_disjoint_and_cover(pydoc_vocab, tmp_path):
  # More files than hosts: each host reads whole files of its own.
  for i in range(4):
    (tmp_path / f"part{i}.jsonl").write_text("\n".join(
        json.dumps({"text": f"document {i} {j} " * (j % 5 + 1)})
        for j in range(30)))
  tasks.span_corruption_task("test_sharded_jsonl", pydoc_vocab,
                             {"train": str(tmp_path / "part*.jsonl")}, "jsonl")
  task = seqio.get_mixture_or_task("test_sharded_jsonl")
  assert len(task.source.list_shards("train")) == 4

  def texts(shard_info):
    ds = task.source.get_dataset("train", shuffle=False,
                                 shard_info=shard_info)
    return [x["text"] for x in ds.as_numpy_iterator()]

  everything = texts(None)
  shards = [texts(seqio.ShardInfo(i, 2)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(everything)
  assert len(everything) == 120
  # And the full pipeline runs on a shard.
  ds = tasks.get_dataset("test_sharded_jsonl", LENGTHS, batch_size=2,
                         shard_info=seqio.ShardInfo(1, 2))
  assert next(ds.as_numpy_iterator())["encoder_input_tokens"].shape == (2, 64)


@pytest.mark.parametrize("pack", [True, False])
def test_batches_have_the_static_shapes_the_step_compiles_for(pydoc_setup, pack):
  # seqio's length assertions are off (pipeline.get_dataset): its converter's trimming
  # and padding alone must give every feature exactly its length, statically.
  ds = tasks.get_dataset("pydoc_summary", LENGTHS, batch_size=4, seed=0, pack=pack)
  expected = {"encoder": LENGTHS["inputs"], "decoder": LENGTHS["targets"]}
  assert len(ds.element_spec) == (8 if pack else 4)
  for name, spec in ds.element_spec.items():
    assert tuple(spec.shape) == (4, expected[name.split("_")[0]]), name
  for batch in _batches(ds.as_numpy_iterator(), 3):
    for name, value in batch.items():
      assert value.shape == (4, expected[name.split("_")[0]]), name


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _span_dataset(seed):
  return tasks.get_dataset("pydoc_span_corruption", LENGTHS, batch_size=4,
                           shuffle=True, seed=seed)


def test_same_seed_same_batches(pydoc_setup):
  a = _batches(tasks.DatasetIterator(_span_dataset(5)), 3)
  b = _batches(tasks.DatasetIterator(_span_dataset(5)), 3)
  c = _batches(tasks.DatasetIterator(_span_dataset(6)), 3)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["encoder_input_tokens"],
                            c[0]["encoder_input_tokens"])


def test_resume_continues_exactly(pydoc_setup, tmp_path):
  reference = _batches(tasks.DatasetIterator(_span_dataset(3)), 7)
  iterator = tasks.DatasetIterator(_span_dataset(3))
  _assert_same(_batches(iterator, 3), reference[:3])
  iterator.save(str(tmp_path))
  _batches(iterator, 2)  # moves on after saving; must not matter
  resumed = tasks.DatasetIterator(_span_dataset(3)).restore(str(tmp_path))
  # Neither repeats batch 2 nor skips batch 3.
  _assert_same(_batches(resumed, 4), reference[3:7])


def test_resume_a_mixture_across_epochs(pydoc_setup, tmp_path):
  seqio.MixtureRegistry.remove("test_pydoc_mixture")
  seqio.MixtureRegistry.add(
      "test_pydoc_mixture", [("pydoc_summary", 1.0), ("pydoc_topic", 2.0)])

  def dataset():
    return tasks.get_dataset("test_pydoc_mixture", LENGTHS, "validation",
                             batch_size=8, seed=11, pack=True)

  # pydoc_topic's ~150 validation examples, sampled 2 in 3, run out after
  # ~28 batches of 8: batch 35 is in its second epoch.
  reference = _batches(tasks.DatasetIterator(dataset()), 40)
  iterator = tasks.DatasetIterator(dataset())
  _batches(iterator, 35)
  iterator.save(str(tmp_path), name="shard3")
  resumed = tasks.DatasetIterator(dataset()).restore(str(tmp_path), name="shard3")
  _assert_same(_batches(resumed, 5), reference[35:])
  with pytest.raises(FileNotFoundError, match="No saved input position"):
    tasks.DatasetIterator(dataset()).restore(str(tmp_path), name="shard0")
