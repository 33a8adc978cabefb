"""The harness of the tpu_scripts tests: a stand-in `gcloud` (fake_gcloud.py) first on
PATH, a private HOME (so ~/.miniend_tpu is per test), played workers and helpers to read
what the scripts did."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
FAKE_GCLOUD = Path(__file__).with_name("fake_gcloud.py")
USER = "tpu-user"  # the local login the tests run as (LOGNAME), and so the remote user
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "resume.sh", "teardown.sh"]
ZONE = "us-central2-b"
PAPER_GIN = "gin_configs/runs/paper_t5_base_6L384H.gin"


# A stand-in for the trainer on a played worker: prints its arguments, then does what
# ~/behaviour says: `exit N` at once, or (default) run until SIGTERM, then "save" and exit 0.
FAKE_MINIEND = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "args: $*"
    echo "tfds: ${TFDS_DATA_DIR:-}"
    echo "platforms: ${JAX_PLATFORMS:-}"
    behaviour=$(cat "$HOME/behaviour" 2>/dev/null || echo run)
    case "$behaviour" in
      exit*) exit "${behaviour#exit }" ;;
    esac
    trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
    sleep 60 &
    wait $!
    """)


class Fake:
  """A fake gcloud, a private HOME (so ~/.miniend_tpu is per test) and a runner."""

  def __init__(self, tmp: Path):
    self.dir = tmp / "fake"
    self.bin = tmp / "bin"
    self.home = tmp / "home"
    self.workers_home = tmp / "workers"
    self.background = []  # scripts started with Popen (watch)
    for p in (self.dir, self.bin, self.home):
      p.mkdir()
    gcloud = self.bin / "gcloud"
    # -S: the stand-in needs only the standard library, and the venv's site start-up
    # costs 4x the rest of a call.
    gcloud.write_text(f"#!{sys.executable} -S\n" + FAKE_GCLOUD.read_text())
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MINIEND_TPU_", "FAKE_GCLOUD_"))
                and k not in ("GCLOUD", "SSH_AUTH_SOCK", "USER", "LNAME", "USERNAME")}
    self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home),
                    FAKE_GCLOUD_DIR=str(self.dir), LOGNAME=USER)

  def run(self, script, *args, scripts_dir=SCRIPTS, env=None, check=None):
    """Runs a script to its end (60 s at most: then it and every process it started
    are killed, so a script that waits forever leaves nothing behind)."""
    argv = ["bash", str(scripts_dir / script), *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**self.env, **(env or {})}, start_new_session=True) as p:
      try:
        out, err = p.communicate(timeout=60)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    proc = subprocess.CompletedProcess(argv, p.returncode, out, err)
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

  def bucket(self, url):
    """Where the fake keeps gs:// URL."""
    return self.dir / "gs" / url.removeprefix("gs://")

  def play_workers(self, node, workers=1):
    """From now on ssh runs the remote commands on `workers` played workers of `node`
    (their homes, USER's, hold a fake miniend); returns the homes."""
    self.env.update(FAKE_GCLOUD_WORKER_HOME=str(self.workers_home), FAKE_GCLOUD_WORKERS=str(workers))
    homes = []
    for i in range(workers):
      home = self.workers_home / USER / f"{node}-w{i}"
      (home / "miniend_jax").mkdir(parents=True)
      (home / "miniend_venv" / "bin").mkdir(parents=True)
      miniend = home / "miniend_venv" / "bin" / "miniend"
      miniend.write_text(FAKE_MINIEND)
      miniend.chmod(0o755)
      homes.append(home)
    return homes

  def stop_workers(self):
    """Kill every process group a played launch left running; returns the processes
    that were left outside those groups (orphans: a run that leaks them on the workers),
    after killing them too."""
    for proc in self.background:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    groups = set()
    for pid_file in self.workers_home.glob("*/*/miniend_logs/*.pid"):
      try:
        groups.add(int(pid_file.read_text()))
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass
    home = f"HOME={self.workers_home}/".encode()
    orphans = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
      try:
        pid = int(environ.parent.name)
        if os.getpgid(pid) in groups or not any(
            v.startswith(home) for v in environ.read_bytes().split(b"\0")):
          continue
        orphans.append(read(environ.parent / "cmdline").replace("\0", " ").strip())
        os.kill(pid, signal.SIGKILL)
      except (OSError, ValueError):  # gone meanwhile, or not ours to read
        pass
    return [o for o in orphans if o]


def printed_commands(stdout):
  """The gcloud argv lists a --dry-run printed (comments skipped)."""
  cmds = [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]
  assert all(c[0] == "gcloud" for c in cmds), stdout
  return [c[1:] for c in cmds]


def ssh_command(call):
  """The --command string of a `gcloud [alpha] compute tpus tpu-vm ssh` call."""
  assert untracked(call)[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
  return call[call.index("--command") + 1]


def untracked(call):
  """A call without its release track (alpha, beta)."""
  return call[1:] if call[0] in ("alpha", "beta") else call


def assert_bash_syntax(cmd):
  subprocess.run(["bash", "-n", "-c", cmd], check=True)


def create_vm(fake, name="miniend-v4-8", accel="v4-8", *extra):
  fake.states("tpu-vm", "READY")
  fake.run("create.sh", "--name", name, "--zone", ZONE, "--accelerator-type", accel,
           "--poll-interval", "0", *extra, check=0)


def wait_for(predicate, what, timeout=15):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def read(path):
  return path.read_text() if path.exists() else ""


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by its parent) counts as gone.
  return "State:\tZ" not in read(Path(f"/proc/{pid}/status"))


def run_files(home, name="miniend-v4-8"):
  """A played worker's log, pid and exit-status files."""
  return [home / "miniend_logs" / f"{name}.{ext}" for ext in ("log", "pid", "exit")]


def kinds(calls):
  """Compact view of a call sequence: 'tpu-vm describe', 'storage cat', ..."""
  return [f"storage {c[1]}" if c[0] == "storage" else f"{c[2]} {c[3]}"
          for c in map(untracked, calls)]


RUN_CHECK = ["storage cat", "storage ls"]  # summary.json and checkpoints/ of the workdir


def start_run(fake, name, accel, *create_flags, queued=False):
  """create -> setup (without the TPU check: played workers have no JAX) -> launch,
  returning the calls each made."""
  fake.states("queued" if queued else "tpu-vm", "ACTIVE" if queued else "READY")
  fake.run("create.sh", "--name", name, "--zone", ZONE, "--accelerator-type", accel,
           "--poll-interval", "0", *create_flags, check=0)
  create = fake.calls()[0]
  fake.run("setup.sh", "--name", name, "--repo", "https://example.com/m.git", "--skip-verify", check=0)
  setup = fake.calls()
  fake.run("launch.sh", "--name", name, "--workdir", "gs://b/run", "--tfds-data-dir", "gs://b/tfds",
           "--env", "NOTE=a b 'c' $d", "--", "distill", "--gin_file", PAPER_GIN,
           "--gin.X.y='it''s'", check=0)
  launch = fake.calls()
  return create, setup, launch


def finish_run(fake, step, preempted=False):
  """What the trainer leaves in gs://b/run when it stops at `step`."""
  (fake.bucket("gs://b/run/checkpoints") / str(step)).mkdir(parents=True, exist_ok=True)
  summary = {"mode": "distill", "step": step, "preempted": preempted, "train": {"loss": 1.0}}
  fake.bucket("gs://b/run/summary.json").write_text(json.dumps(summary, indent=2))


def watch(fake, name, *flags):
  """`resume.sh --name NAME FLAGS` started in the background (stop_workers ends it)."""
  proc = subprocess.Popen(["bash", str(SCRIPTS / "resume.sh"), "--name", name, *flags],
                          env=fake.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  fake.background.append(proc)
  return proc


def common_sh(snippet, **variables):
  """What `snippet` prints in bash after sourcing tpu_scripts/common.sh."""
  preset = "".join(f"{k}={shlex.quote(v)}; " for k, v in variables.items())
  proc = subprocess.run(["bash", "-c", f"{preset}source {SCRIPTS / 'common.sh'}; {snippet}"],
                        capture_output=True, text=True, check=True)
  return proc.stdout
