"""notebooks/quickstart.ipynb: made for Colab, and its install cell. Its run top to bottom on
the CPU from this clone (its tiny test mode) is in test_quickstart.py, where it resumes the
quickstart test's work directory and shares its compiled programs."""

import importlib.util
import json
import subprocess

import nbformat
import pytest

from tests.quickstart.conftest import NOTEBOOK

_FIND_SPEC = importlib.util.find_spec


def _source(nb):
  return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _install_cell(nb):
  (cell,) = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
  return cell.source


def test_notebook_is_made_for_colab():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  source = _source(nb)
  assert "ORG" not in json.dumps(nb), "no placeholder repository"
  install = _install_cell(nb)
  assert 'REPO = ""  # @param {type:"string"}' in install  # a Colab form field
  assert "google.colab" in source and "MINIEND_NOTEBOOK_SKIP_INSTALL" in source
  assert "jax.devices()" in source and '"tpu"' in source and '"gpu"' in source
  assert "quickstart.run(" in source and "display(Image(" in source
  assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code"), "commit it clean"


def _run_install_cell(monkeypatch, cwd, repo="", installed=False):
  """Executes the install cell in `cwd`; returns the pip commands it ran."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  commands = []
  monkeypatch.chdir(cwd)
  monkeypatch.delenv("MINIEND_NOTEBOOK_SKIP_INSTALL", raising=False)
  monkeypatch.setenv("MINIEND_REPO", repo)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      _FIND_SPEC(name, *a) if installed or name != "miniend_jax" else None))
  monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kw: commands.append(cmd[3:]))
  exec(compile(_install_cell(nb), "install", "exec"), {})  # pylint: disable=exec-used
  return commands


def test_install_cell_sources(tmp_path, monkeypatch, capsys):
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  # Nothing to install from: a clear message, not a pip error.
  with pytest.raises(RuntimeError, match="Set REPO in the form above"):
    _run_install_cell(monkeypatch, outside)
  url = "https://github.com/someone/miniend_jax.git"
  assert _run_install_cell(monkeypatch, outside, url) == [
      ["install", "-q", f"miniend_jax @ git+{url}"]]
  wheel = str(tmp_path / "miniend_jax-0.1.0-py3-none-any.whl")
  assert _run_install_cell(monkeypatch, outside, wheel) == [["install", "-q", wheel]]
  # Inside a clone (any folder of it), not installed yet: an editable install of the clone.
  clone = tmp_path / "clone"
  (clone / "notebooks").mkdir(parents=True)
  (clone / "pyproject.toml").write_text('[project]\nname = "miniend_jax"\n')
  assert _run_install_cell(monkeypatch, clone / "notebooks") == [
      ["install", "-q", "-e", str(clone.resolve())]]
  # Installed already: nothing to do.
  assert _run_install_cell(monkeypatch, outside, installed=True) == []
  assert "skipping pip install" in capsys.readouterr().out
