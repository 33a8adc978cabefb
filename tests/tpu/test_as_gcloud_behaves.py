"""tpu_scripts/ against gcloud as it really behaves (issue 25, and issue 19's hung runs):
the stand-in refuses flags per release track, an ssh-agent without gcloud's key, and
answers every TPU state; played workers hold their chips, hang, or stop answering."""

import os
import re
import signal
import subprocess
import time

import pytest

from tests.tpu.stand_in import (
    SCRIPTS, USER, ZONE, alive, common_sh, create_vm, kinds, printed_commands, read, run_files,
    start_run, wait_for, watch)


def gcloud(fake, *args):
  return subprocess.run([str(fake.bin / "gcloud"), *args], env=fake.env, capture_output=True,
                        text=True)


# ------------------------------------------------------------------ the stand-in

@pytest.mark.parametrize("args,error", [
    (["compute", "tpus", "tpu-vm", "ssh", "n", "--zone", ZONE, "--tunnel-through-iap"],
     "(gcloud.compute.tpus.tpu-vm.ssh) unrecognized arguments: --tunnel-through-iap"),
    (["compute", "tpus", "tpu-vm", "scp", "a", "n:b", "--zone", ZONE, "--batch-size", "2"],
     "unrecognized arguments: --batch-size"),
    (["beta", "compute", "tpus", "tpu-vm", "ssh", "n", "--zone", ZONE],
     "(gcloud.beta.compute.tpus) Invalid choice: 'tpu-vm'."),
    (["alpha", "compute", "tpus", "tpu-vm", "ssh", "n", "--zone", ZONE, "--internal-ip",
      "--tunnel-through-iap"], "At most one of --internal-ip | --tunnel-through-iap"),
    (["compute", "tpus", "tpu-vm", "create", "n", "--zone", ZONE, "--accelerator-type", "v4-8"],
     "Exactly one of (--version) must be specified."),
    (["compute", "tpus", "queued-resources", "create", "n", "--zone", ZONE, "--node-id", "n",
      "--node-count", "2", "--accelerator-type", "v4-8"], "At most one of --node-id | --node-count"),
    (["compute", "tpus", "tpu-vm", "create", "n", "--zone", ZONE, "--version", "v",
      "--spot=true"], "argument --spot: ignored explicit argument 'true'"),
    (["compute", "tpus", "tpu-vm", "create", "n", "--zone", ZONE, "--version", "v",
      "--provisioning-model", "spot"], "unrecognized arguments: --provisioning-model"),
])
def test_the_stand_in_refuses_what_gcloud_refuses(fake, args, error):
  proc = gcloud(fake, *args)
  assert proc.returncode == 2 and error in proc.stderr, proc.stderr
  assert fake.calls() == []


def test_the_stand_in_accepts_the_alpha_only_flags_on_alpha(fake):
  assert gcloud(fake, "alpha", "compute", "tpus", "tpu-vm", "ssh", "u@n", "--zone", ZONE,
                "--tunnel-through-iap", "--worker=all", "--command", "true").returncode == 0
  assert gcloud(fake, "alpha", "compute", "tpus", "tpu-vm", "create", "n", "--zone", ZONE,
                "--version", "v", "--provisioning-model", "spot").returncode == 0
  assert len(fake.calls()) == 2


# ------------------------------------------------------------------ reaching the workers

def test_iap_goes_through_gcloud_alpha_and_is_remembered(fake, tmp_path):
  """MINIEND_TPU_SSH_FLAGS=--tunnel-through-iap: every ssh and scp through `gcloud alpha`
  (the only track with the flag); the TPU API calls stay on GA."""
  iap = {"MINIEND_TPU_SSH_FLAGS": "--tunnel-through-iap"}
  fake.states("tpu-vm", "READY")
  fake.run("create.sh", "--name", "pod", "--zone", ZONE, "--accelerator-type", "v4-32",
           "--poll-interval", "0", env=iap, check=0)
  fake.run("setup.sh", "--name", "pod", "--repo", "https://example.com/m.git", env=iap, check=0)
  # Later scripts, run without the variable (resume.sh --watch under cron), still use IAP.
  fake.run("launch.sh", "--name", "pod", "--workdir", "gs://b/run", "--", "distill", check=0)
  fake.run("logs.sh", "--name", "pod", "--no-follow", check=0)
  calls = fake.calls()
  remote = [c for c in calls if "ssh" in c or "scp" in c]
  assert len(remote) == 4 and all(c[0] == "alpha" and "--tunnel-through-iap" in c for c in remote)
  assert [c for c in calls if c not in remote and c[0] == "alpha"] == []


def test_internal_ips_are_created_and_reached_through_iap(fake):
  fake.states("queued", "ACTIVE")
  fake.run("create.sh", "--name", "q", "--zone", ZONE, "--accelerator-type", "v5litepod-16",
           "--queued", "--internal-ips", "--poll-interval", "0", check=0)
  create = fake.calls()[0]
  assert create[:4] == ["compute", "tpus", "queued-resources", "create"] and "--internal-ips" in create
  fake.run("setup.sh", "--name", "q", "--repo", "u", "--skip-verify", check=0)
  (install,) = fake.calls()
  assert install[:5] == ["alpha", "compute", "tpus", "tpu-vm", "ssh"] and "--tunnel-through-iap" in install
  # From inside the VPC: --internal-ip, on GA.
  fake.run("logs.sh", "--name", "q", "--no-follow", env={"MINIEND_TPU_SSH_FLAGS": "--internal-ip"}, check=0)
  (logs,) = fake.calls()
  assert logs[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--internal-ip" in logs
  # A re-created TPU is created the same way.
  proc = fake.run("resume.sh", "--name", "q", "--dry-run", check=0)
  assert create in printed_commands(proc.stdout)
  fake.states("tpu-vm", "READY")
  fake.run("create.sh", "--name", "vm", "--zone", ZONE, "--accelerator-type", "v4-8",
           "--internal-ips", "--poll-interval", "0", check=0)
  assert "--internal-ips" in fake.calls()[0]


@pytest.fixture
def ssh_agent(fake):
  """A real ssh-agent holding some other key, and gcloud's key in the fake HOME."""
  out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
  agent = dict(re.findall(r"(SSH_AUTH_SOCK|SSH_AGENT_PID)=([^;]+);", out))
  env = {**fake.env, **agent}
  ssh = fake.home / ".ssh"
  ssh.mkdir()
  for key in ("other", "google_compute_engine"):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)],
                   check=True)
  subprocess.run(["ssh-add", "-q", str(ssh / "other")], env=env, check=True, capture_output=True)
  fake.env.update(agent)
  yield env
  os.kill(int(agent["SSH_AGENT_PID"]), signal.SIGTERM)


def test_scp_to_several_workers_puts_gcloud_key_in_the_agent_first(fake, ssh_agent, tmp_path):
  root = tmp_path / "checkout"
  (root / "tpu_scripts").mkdir(parents=True)
  for f in SCRIPTS.glob("*.sh"):
    (root / "tpu_scripts" / f.name).write_text(f.read_text())
  subprocess.run(["git", "init", "-q", str(root)], check=True)
  key = fake.home / ".ssh" / "google_compute_engine"
  fake.env["FAKE_GCLOUD_WORKERS"] = "2"
  # What gcloud says to a script that does not add it.
  proc = subprocess.run([str(fake.bin / "gcloud"), "compute", "tpus", "tpu-vm", "scp", "--recurse",
                         "d", "n:d", "--worker=all", "--zone", ZONE], env=fake.env,
                        capture_output=True, text=True)
  assert proc.returncode == 1 and "SSH Key is not present in the SSH agent" in proc.stderr
  fake.calls()
  proc = fake.run("setup.sh", "--name", "n", "--zone", ZONE, "--scp-local", "--skip-verify",
                  scripts_dir=root / "tpu_scripts", check=0)
  assert f"adding {key} to your ssh-agent" in proc.stderr
  assert kinds(fake.calls()) == ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh"]
  fingerprint = subprocess.run(["ssh-keygen", "-lf", str(key)], capture_output=True, text=True,
                               check=True).stdout.split()[1]
  assert fingerprint in subprocess.run(["ssh-add", "-l"], env=ssh_agent, capture_output=True,
                                       text=True).stdout


def test_the_remote_user_is_recorded_so_another_login_finds_the_run(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  start_run(fake, "miniend-v4-8", "v4-8")  # as LOGNAME=USER: recorded
  wait_for(lambda: "args:" in read(run_files(worker)[0]), "the run")
  # resume.sh --watch from another local login: same workers, same home, run found alive.
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", env={"LOGNAME": "someone-else"}, check=0)
  assert "miniend runs on all 1 workers" in proc.stderr
  ssh = [c for c in fake.calls() if "ssh" in c]
  assert ssh and all(c[4] == f"{USER}@miniend-v4-8" for c in ssh)
  assert not (fake.workers_home / "someone-else").exists()


# ------------------------------------------------------------------ TPU states

def test_describe_errors_other_than_not_found_stop_with_gcloud_message(fake):
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  fake.states("tpu-vm", "PERMISSION_DENIED")
  proc = fake.run("resume.sh", "--name", "miniend-v4-8")
  assert proc.returncode == 1
  assert "cannot read the state of miniend-v4-8" in proc.stderr
  assert "PERMISSION_DENIED: Permission 'tpu.nodes.get' denied" in proc.stderr
  assert kinds(fake.calls()) == ["tpu-vm describe"]  # no delete, no create over it
  # create.sh stops at once too, instead of polling until its timeout.
  fake.states("tpu-vm", "CREATING", "PERMISSION_DENIED")
  start = time.monotonic()
  proc = fake.run("create.sh", "--name", "other", "--zone", ZONE, "--accelerator-type", "v4-8",
                  "--poll-interval", "0", "--timeout", "30")
  assert proc.returncode == 1 and "PERMISSION_DENIED" in proc.stderr
  assert time.monotonic() - start < 10


NODE_STATES = {
    "READY": "ready", "CREATING": "pending", "STARTING": "pending", "RESTARTING": "pending",
    "REPAIRING": "pending", "REIMAGING": "pending", "UNHIDING": "pending", "PREEMPTED": "gone",
    "TERMINATED": "gone", "STOPPED": "gone", "STOPPING": "gone", "HIDING": "gone",
    "HIDDEN": "gone", "DELETING": "gone", "NOT_FOUND": "gone", "UNKNOWN": "failed",
    "STATE_UNSPECIFIED": "failed", "CREATING_RESOURCES": "unknown"}
QUEUED_STATES = {
    "ACTIVE": "ready", "CREATING": "pending", "ACCEPTED": "pending",
    "WAITING_FOR_RESOURCES": "pending", "PROVISIONING": "pending", "SUSPENDING": "gone",
    "SUSPENDED": "gone", "DELETING": "gone", "NOT_FOUND": "gone", "FAILED": "failed",
    "STATE_UNSPECIFIED": "failed", "READY": "unknown"}


@pytest.fixture(scope="module")
def state_classes():
  """state_class of every state, for nodes and queued resources, in one bash run."""
  out = {}
  for mode, states in (("vm", NODE_STATES), ("queued", QUEUED_STATES)):
    text = common_sh(f"for s in {' '.join(states)}; do echo $s $(state_class $s); done", MODE=mode)
    out[mode] = dict(line.split() for line in text.splitlines())
  return out


@pytest.mark.parametrize("mode,state,expected",
                         [("vm", s, c) for s, c in NODE_STATES.items()]
                         + [("queued", s, c) for s, c in QUEUED_STATES.items()])
def test_every_tpu_state_is_classified(state_classes, mode, state, expected):
  assert state_classes[mode][state] == expected


RECREATE = ["tpu-vm delete", "tpu-vm create", "tpu-vm describe", "tpu-vm ssh"]


@pytest.mark.parametrize("states,sequence", [
    # pending: wait for it, then set up (a reimaged disk is empty).
    (["REIMAGING", "READY"], ["tpu-vm describe", "tpu-vm ssh"]),
    # gone, still settling: wait until the deletion is over, then create (nothing to delete).
    (["DELETING", "DELETING", "NOT_FOUND", "READY"], ["tpu-vm describe", "tpu-vm describe",
                                                      *RECREATE[1:]]),
    # failed: a node after a failed repair is deleted and created again.
    (["UNKNOWN", "READY"], RECREATE),
])
def test_resume_acts_on_each_kind_of_state(fake, states, sequence):
  create_vm(fake)
  fake.run("setup.sh", "--name", "miniend-v4-8", "--repo", "u", "--skip-verify", check=0)
  fake.calls()
  fake.states("tpu-vm", *states)
  proc = fake.run("resume.sh", "--name", "miniend-v4-8", "--poll-interval", "0", check=0)
  assert kinds(fake.calls()) == ["tpu-vm describe", *sequence]
  assert "no launch recorded" in proc.stderr  # so nothing more to start


def test_resume_refuses_to_guess_on_a_state_it_does_not_know(fake):
  start_run(fake, "q", "v5p-32", "--queued", queued=True)
  fake.states("queued", "CREATING_RESOURCES")
  proc = fake.run("resume.sh", "--name", "q")
  assert proc.returncode == 1 and "state 'CREATING_RESOURCES', which these scripts do not know" in proc.stderr
  assert kinds(fake.calls()) == ["queued-resources describe"]
  fake.states("queued", "FAILED", "ACTIVE")  # failed: deleted and requested again
  fake.run("resume.sh", "--name", "q", "--poll-interval", "0", check=0)
  assert kinds(fake.calls())[3:5] == ["queued-resources delete", "queued-resources create"]


# ------------------------------------------------------------------ the chips

def test_launch_stops_what_holds_the_chips_and_clears_the_lock_file(fake):
  (worker,) = fake.play_workers("miniend-v4-8")
  create_vm(fake)
  root = worker / ".root"
  (root / "dev").mkdir(parents=True)
  (root / "tmp").mkdir()
  (root / "dev" / "accel0").write_text("")
  lock = root / "tmp" / "libtpu_lockfile"
  lock.write_text("")
  # A process of an earlier launch (or another user) that holds the chip.
  holder = subprocess.Popen(["bash", "-c", f'exec 3<"{root}/dev/accel0"; exec sleep 60'])
  try:
    wait_for(lambda: subprocess.run(["lsof", "-t", "-w", str(root / "dev" / "accel0")],
                                    capture_output=True).returncode == 0, "the holder")
    args = ["--name", "miniend-v4-8", "--workdir", "gs://b/run", "--", "distill"]
    proc = fake.run("launch.sh", *args)
    assert proc.returncode == 1
    assert f"the TPU is held by another process: {holder.pid} " in proc.stderr
    assert "pass --restart" in proc.stderr and lock.exists() and holder.poll() is None
    proc = fake.run("launch.sh", "--restart", *args, check=0)
    assert f"stopping what holds the TPU: {holder.pid} " in proc.stdout
    assert holder.wait(timeout=5) == -signal.SIGTERM
    assert not lock.exists()  # removed once nothing held the chip
    log = run_files(worker)[0]
    wait_for(lambda: "platforms:" in read(log), "the run")
    assert "platforms: tpu" in read(log)  # never a quiet fallback to the CPU
  finally:
    holder.kill()
    holder.wait()
  # A lock file left by a killed run, nothing holding the chips: removed, no --restart needed.
  lock.write_text("")
  fake.run("launch.sh", "--name", "miniend-v4-8", "--relaunch", "--restart", check=0)
  assert not lock.exists()


def test_readme_manual_stop_waits_for_the_run_before_removing_the_lock():
  (line,) = [ln for ln in (SCRIPTS / "README.md").read_text().splitlines()
             if "libtpu_lockfile" in ln and "kill" in ln]
  assert line.index("tail --pid=") < line.index("rm -f /tmp/libtpu_lockfile")


# ------------------------------------------------------------------ hung and unreachable

def start_played_run(fake):
  """A run launched on one played worker; its log, pid file and first pid."""
  (worker,) = fake.play_workers("miniend-v4-8")
  start_run(fake, "miniend-v4-8", "v4-8", "--spot")
  log, pid_file, _ = run_files(worker)
  wait_for(lambda: "args:" in read(log), "the run")
  return log, pid_file, int(pid_file.read_text())


def test_resume_relaunches_a_run_whose_metrics_stopped_changing(fake):
  log, _, first = start_played_run(fake)
  metrics = fake.bucket("gs://b/run/logs/train_metrics.jsonl")
  metrics.parent.mkdir(parents=True)
  metrics.write_text('{"step": 10}\n')
  resume = ["resume.sh", "--name", "miniend-v4-8", "--hung-after", "1"]
  for line in ('{"step": 20}\n', ""):  # it grows (alive), then it stops (hung)
    assert "nothing to do" in fake.run(*resume, check=0).stderr
    metrics.write_text(metrics.read_text() + line)
    time.sleep(1.1)
  proc = fake.run(*resume, check=0)
  assert re.search(r"train_metrics.jsonl has not changed for \d+s \(--hung-after 1\): it is hung",
                   proc.stderr)
  assert "relaunched" in proc.stderr and not alive(first)
  wait_for(lambda: read(log).count("args:") == 2, "the relaunch")
  assert 'RESUME_STALLED="1"' in fake.state_file("miniend-v4-8").read_text()


def test_watch_recreates_a_tpu_whose_worker_stopped_answering(fake):
  log, pid_file, first = start_played_run(fake)
  (fake.dir / "unreachable").write_text("")  # READY, but ssh times out
  proc = watch(fake, "miniend-v4-8", "--watch", "0.1", "--recreate-after", "2",
               "--poll-interval", "0")
  try:
    # The re-created TPU's new VM (the stand-in forgot the old run) runs it again.
    wait_for(lambda: "args:" in read(log) and int(read(pid_file) or first) != first,
             "the run on the re-created TPU")
  finally:
    fake.run("teardown.sh", "--name", "miniend-v4-8", check=0)
    _, err = proc.communicate(timeout=20)
  before, recreated, _ = err.partition("2 rounds in a row failed: re-creating miniend-v4-8")
  assert recreated and before.count("this round failed") == 2
  calls = kinds(fake.calls())
  assert calls.count("tpu-vm create") == 1 and calls.index("tpu-vm delete") < calls.index("tpu-vm create")
