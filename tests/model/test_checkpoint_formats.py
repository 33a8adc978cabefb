"""Teachers as they are published: one set of weights in every format and layout gives
bitwise the same parameters, on the host and sliced into a mesh; what cannot be read
is refused in one line, and a .bin holding code is never run."""

import os
import sys

import huggingface_hub
import jax
import numpy as np
import pytest
import torch

from miniend_jax import cli
from miniend_jax.model import hf, t5
from miniend_jax.train import partitioning, program
from tests.model import checkpoint_testing as ct
from tests.model.hf_testing import make_hf_model, make_model
from tests.model.hub_testing import LocalHubApi, publish

ROUTES = ["safetensors_sharded", "bin", "bin_sharded", "msgpack", "msgpack_sharded", "t5x",
          "t5x_legacy"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """{route: directory} of one T5 v1.1 model written in every layout."""
  model = make_hf_model(family="v1_1", seed=21, vocab_size=96)
  root = tmp_path_factory.mktemp("published")
  dirs = {name: str(root / name) for name in ["safetensors"] + ROUTES}
  model.save_pretrained(dirs["safetensors"])
  model.save_pretrained(dirs["safetensors_sharded"], max_shard_size="20KB")
  ct.write_bin(model, dirs["bin"])
  ct.write_bin(model, dirs["bin_sharded"], num_shards=3)
  ct.write_msgpack(model, dirs["msgpack"])
  ct.write_msgpack(model, dirs["msgpack_sharded"], num_shards=3)
  ct.write_t5x(model, dirs["t5x"])  # passed as the parent: the newest step is read
  dirs["t5x_legacy"] = ct.write_t5x(  # a step directory, older specs, inline arrays
      model, dirs["t5x_legacy"], legacy_specs=True,
      inline=("encoder/layers_0/pre_attention_layer_norm/scale", "decoder/decoder_norm/scale"))
  return dirs


def _same(params, reference):
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_every_format_gives_bitwise_the_same_parameters(published):
  config, reference = hf.load_hf(published["safetensors"])
  assert os.listdir(published["t5x"]) == ["checkpoint_1000"]
  for route in ROUTES:
    got_config, params = hf.load_hf(published[route])
    # T5X checkpoints carry no dropout rate (inference: 0); everything else agrees.
    assert got_config.replace(dropout_rate=config.dropout_rate) == config, route
    _same(params, reference)


def test_every_format_loads_sliced_into_a_scanned_mesh(published):
  config = hf.read_hf_config(published["safetensors"]).replace(scan_layers=True,
                                                                param_dtype="bfloat16")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=4, model=2))
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), mesh)
  reference = t5.stack_layer_params(
      hf.load_hf(published["safetensors"], param_dtype="bfloat16")[1], config)
  for route in ["safetensors"] + ROUTES:
    _, params = hf.load_hf_sharded(published[route], shardings, config=config)
    _same(params, reference)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
      assert got.sharding == want, route


@pytest.mark.parametrize("family", ["umt5", "v1_0"])
def test_scanned_umt5_t5x_and_tied_heads(family, tmp_path):
  """umT5 as t5x's scalable T5 writes it (layers scanned, heads split, a table per
  layer); T5 v1.0's tied head (no lm_head in Flax, no logits_dense in T5X)."""
  # (128: T5X checkpoints do not record the relative-position distance, t5x's is 128.)
  model = (make_model("umt5", seed=5, relative_attention_max_distance=128) if family == "umt5"
           else make_hf_model(family="v1_0", seed=6))
  model.save_pretrained(tmp_path / "hf")
  config, reference = hf.load_hf(str(tmp_path / "hf"))
  routes = {"t5x": ct.write_t5x(model, tmp_path / "t5x", scanned=family == "umt5")}
  if family == "v1_0":
    routes.update(msgpack=ct.write_msgpack(model, tmp_path / "msgpack"),
                  bin=ct.write_bin(model, tmp_path / "bin"))
  for route, directory in routes.items():
    got_config, params = hf.load_hf(str(directory))
    assert got_config.replace(dropout_rate=config.dropout_rate) == config, route
    _same(params, reference)


def test_a_bin_that_holds_code_is_refused_not_run(tmp_path):
  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):  # unpickling this would create `marker`
      return (open, (str(marker), "w"))

  model = make_hf_model(family="v1_1", seed=22)
  for name, extra in (("code", Payload()), ("number", 3)):
    directory = tmp_path / name
    ct.write_bin(model, directory)
    state = model.state_dict()
    state["extra"] = extra
    torch.save(state, directory / "pytorch_model.bin")
  with pytest.raises(hf.CheckpointError, match=r"Refusing .*weights_only=True.*code is never run"):
    hf.load_hf(str(tmp_path / "code"))
  assert not marker.exists()
  with pytest.raises(hf.CheckpointError, match=r"non-tensor entries \(\['extra'\]\)"):
    hf.load_hf(str(tmp_path / "number"))


def test_without_torch_a_bin_asks_for_it_in_one_line(published, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(hf.CheckpointError, match=r"needs torch: `pip install torch`.* safetensors"):
    hf.load_hf(published["bin"])


def test_a_directory_without_readable_weights_says_what_it_holds(published, tmp_path, capsys):
  directory = tmp_path / "tf_only"
  directory.mkdir()
  (directory / "config.json").write_text(open(os.path.join(published["bin"],
                                                           "config.json")).read())
  (directory / "tf_model.h5").write_bytes(b"\0")
  code = cli.main(["convert", "--teacher", str(directory), "--out_dir", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert code == 3 and len(err.splitlines()) == 1, err
  for expected in ("config.json, tf_model.h5", "model.safetensors", "flax_model.msgpack",
                   "pytorch_model.bin", "T5X"):
    assert expected in err


def test_hub_ids_fetch_one_format_at_the_revision_asked(published, tmp_path, monkeypatch):
  hub_root = str(tmp_path / "hub")
  # main: the era's layout (PyTorch, Flax, TF weights); safetensors only in a PR ref.
  for route in ("bin", "msgpack"):
    publish(hub_root, "google/t5-tiny", published[route])
  publish(hub_root, "google/t5-tiny", published["safetensors"], revision="refs/pr/2")
  (tmp_path / "hub" / "google" / "t5-tiny" / "main" / "tf_model.h5").write_bytes(b"\0")
  publish(hub_root, "google/tf-only", str(tmp_path / "hub" / "google" / "t5-tiny" / "main"))
  os.remove(os.path.join(hub_root, "google/tf-only/main/pytorch_model.bin"))
  os.remove(os.path.join(hub_root, "google/tf-only/main/flax_model.msgpack"))
  monkeypatch.setattr(LocalHubApi, "root", hub_root)
  monkeypatch.setattr(LocalHubApi, "cache", str(tmp_path / "cache"))
  monkeypatch.setattr(LocalHubApi, "downloaded", [])
  monkeypatch.setattr(huggingface_hub, "HfApi", LocalHubApi)

  _, reference = hf.load_hf(published["safetensors"])
  _same(hf.load_hf("google/t5-tiny")[1], reference)
  assert sorted(f for *_, f in LocalHubApi.downloaded) == ["config.json", "flax_model.msgpack"]
  LocalHubApi.downloaded.clear()
  _same(hf.load_hf("google/t5-tiny@refs/pr/2")[1], reference)
  assert sorted(f for *_, f in LocalHubApi.downloaded) == [
      "config.json", "generation_config.json", "model.safetensors"]
  assert {revision for _, revision, _ in LocalHubApi.downloaded} == {"refs/pr/2"}
  with pytest.raises(FileNotFoundError, match="has no revision 'v9'"):
    hf.load_hf("google/t5-tiny@v9")
  with pytest.raises(FileNotFoundError, match="no Hugging Face repository 'google/t5-none'"):
    hf.load_hf("google/t5-none")
  with pytest.raises(hf.CheckpointError, match=r"repository google/tf-only holds config.json, "
                                               r"tf_model.h5; miniend_jax reads"):
    hf.load_hf("google/tf-only")
  # A config alone fetches config.json alone; a preset-named id needs no download.
  LocalHubApi.downloaded.clear()
  assert hf.read_hf_config("google/t5-tiny@refs/pr/2").num_layers == 2
  assert [f for *_, f in LocalHubApi.downloaded] == ["config.json"]
  assert program.model_config_of("google/t5-v1_1-xxl@refs/pr/2").num_heads == 64
