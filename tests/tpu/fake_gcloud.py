"""A stand-in for `gcloud`, for tests/tpu: the tests install it first on PATH.

It refuses what the real gcloud refuses for the commands tpu_scripts/ issue: each
command's flags per release track (GA, alpha, beta), required flags, mutually
exclusive ones, positional arguments; then it appends the call's argv (one JSON list
a line) to FAKE_GCLOUD_DIR/calls.log and plays the rest:

- the TPU API: `describe` answers the states listed in FAKE_GCLOUD_DIR/states.tpu-vm
  (or states.queued), one per call, the last one repeating; NOT_FOUND and
  PERMISSION_DENIED answer as gcloud's errors do;
- Cloud Storage: gs://BUCKET/PATH is FAKE_GCLOUD_DIR/gs/BUCKET/PATH;
- scp to several workers checks, as gcloud does, that the ssh-agent (when one runs with
  keys) holds ~/.ssh/google_compute_engine;
- the workers (FAKE_GCLOUD_WORKER_HOME set): `ssh` runs the remote command with bash on
  each played worker, as USER (USER@ in the target, else the local login, as gcloud),
  in the home WORKER_HOME/USER/NODE-wI, where `hostname` says t1v-n-NODE-w-I and `sudo`
  runs the command as is; MINIEND_TPU_CHIP_ROOT points the scripts at the worker's own
  /dev and /tmp (HOME/.root). Setup's install command is recorded but not run. While
  FAKE_GCLOUD_DIR/unreachable exists, ssh fails as for a worker that does not answer;
  `create` makes new VMs: it removes that file, and stops and forgets the played runs.

The flag tables come from the gcloud CLI's sources (Cloud SDK 528.0.0 and 578.0.0 agree
on every flag here): lib/surface/compute/tpus/tpu_vm/{ssh,scp}.py with
command_lib/compute/tpus/tpu_vm/ssh.py:AddTPUSSHArgs (IAP and batching only where the
track enables them: alpha), command_lib/compute/ssh_utils.py:BaseSSHCLIHelper.Args,
lib/surface/compute/tpus/{tpu_vm,queued_resources}/{create,describe,delete}.yaml, and
the groups' release tracks (compute tpus: GA, beta, alpha; tpu-vm and queued-resources:
GA, alpha).
"""

import getpass
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

VALUE, SWITCH = True, False  # whether a flag takes a value

# calliope's gcloud-wide flags.
WIDE = {"--project": VALUE, "--format": VALUE, "--quiet": SWITCH, "-q": SWITCH,
        "--verbosity": VALUE, "--account": VALUE, "--configuration": VALUE,
        "--impersonate-service-account": VALUE, "--billing-project": VALUE,
        "--flatten": VALUE, "--log-http": SWITCH, "--trace-token": VALUE,
        "--user-output-enabled": SWITCH, "--no-user-output-enabled": SWITCH}

# ssh and scp, every track: BaseSSHCLIHelper.Args, the key-expiry pair, --worker, --zone;
# GA adds --internal-ip alone, alpha adds it with --tunnel-through-iap (one or the other)
# and --batch-size.
_SSH_COMMON = {"--dry-run": SWITCH, "--force-key-file-overwrite": SWITCH, "--plain": SWITCH,
               "--ssh-key-file": VALUE, "--strict-host-key-checking": VALUE,
               "--ssh-key-expiration": VALUE, "--ssh-key-expire-after": VALUE,
               "--worker": VALUE, "--zone": VALUE, "--internal-ip": SWITCH}
_ALPHA_ROUTING = {"--tunnel-through-iap": SWITCH, "--batch-size": VALUE}
_SSH = {**_SSH_COMMON, "--ssh-flag": VALUE, "--command": VALUE, "--output-directory": VALUE}
_SCP = {**_SSH_COMMON, "--scp-flag": VALUE, "--recurse": SWITCH, "--compress": SWITCH}

_VM_CREATE_GA = {
    "--zone": VALUE, "--async": SWITCH, "--accelerator-type": VALUE, "--type": VALUE,
    "--topology": VALUE, "--description": VALUE, "--network": VALUE, "--subnetwork": VALUE,
    "--internal-ips": SWITCH, "--queue-count": VALUE, "--version": VALUE,
    "--preemptible": SWITCH, "--spot": SWITCH, "--reserved": SWITCH, "--range": VALUE,
    "--service-account": VALUE, "--scopes": VALUE, "--labels": VALUE, "--metadata": VALUE,
    "--metadata-from-file": VALUE, "--tags": VALUE, "--data-disk": VALUE,
    "--shielded-secure-boot": SWITCH, "--boot-disk": VALUE}
_VM_CREATE_ALPHA = {**_VM_CREATE_GA, "--image": VALUE, "--autocheckpoint-enabled": SWITCH,
                    "--reservation": VALUE, "--provisioning-model": VALUE}
_QR_CREATE_GA = {
    "--zone": VALUE, "--async": SWITCH, "--node-id": VALUE, "--node-count": VALUE,
    "--node-prefix": VALUE, "--accelerator-type": VALUE, "--type": VALUE, "--topology": VALUE,
    "--runtime-version": VALUE, "--spot": SWITCH, "--guaranteed": SWITCH,
    "--min-duration": VALUE, "--reserved": SWITCH, "--valid-after-duration": VALUE,
    "--valid-after-time": VALUE, "--valid-until-duration": VALUE, "--valid-until-time": VALUE,
    "--internal-ips": SWITCH, "--reservation-host-project": VALUE,
    "--reservation-host-folder": VALUE, "--reservation-host-organization": VALUE,
    "--network": VALUE, "--subnetwork": VALUE, "--service-account": VALUE, "--scopes": VALUE,
    "--metadata": VALUE, "--metadata-from-file": VALUE, "--tags": VALUE, "--data-disk": VALUE,
    "--description": VALUE, "--labels": VALUE, "--shielded-secure-boot": SWITCH,
    "--range": VALUE, "--boot-disk": VALUE}
_QR_CREATE_ALPHA = {**_QR_CREATE_GA, "--workload-type": VALUE, "--best-effort": SWITCH,
                    "--provisioning-model": VALUE, "--max-run-duration": VALUE,
                    "--reservation": VALUE, "--autocheckpoint-enabled": SWITCH,
                    "--network-config": VALUE}

# (group, verb) -> flags per track, positional arguments (least, most: None = any),
# required flags (each entry: one of these), mutually exclusive flags.
COMMANDS = {
    ("tpu-vm", "ssh"): dict(tracks={"GA": _SSH, "alpha": {**_SSH, **_ALPHA_ROUTING}},
                            positionals=(1, 1), exclusive=[("--internal-ip", "--tunnel-through-iap")]),
    ("tpu-vm", "scp"): dict(tracks={"GA": _SCP, "alpha": {**_SCP, **_ALPHA_ROUTING}},
                            positionals=(2, None), exclusive=[("--internal-ip", "--tunnel-through-iap")]),
    ("tpu-vm", "create"): dict(tracks={"GA": _VM_CREATE_GA, "alpha": _VM_CREATE_ALPHA},
                               positionals=(1, 1), required=[("--version",)],
                               exclusive=[("--accelerator-type", "--type")]),
    ("tpu-vm", "describe"): dict(tracks={"GA": {"--zone": VALUE}, "alpha": {"--zone": VALUE}},
                                 positionals=(1, 1)),
    ("tpu-vm", "delete"): dict(tracks={t: {"--zone": VALUE, "--async": SWITCH} for t in ("GA", "alpha")},
                               positionals=(1, 1)),
    ("queued-resources", "create"): dict(
        tracks={"GA": _QR_CREATE_GA, "alpha": _QR_CREATE_ALPHA}, positionals=(1, 1),
        required=[("--node-id", "--node-count"), ("--accelerator-type", "--type")],
        exclusive=[("--node-id", "--node-count"), ("--accelerator-type", "--type")]),
    ("queued-resources", "describe"): dict(tracks={"GA": {"--zone": VALUE}, "alpha": {"--zone": VALUE}},
                                           positionals=(1, 1)),
    ("queued-resources", "delete"): dict(
        tracks={t: {"--zone": VALUE, "--async": SWITCH, "--force": SWITCH} for t in ("GA", "alpha")},
        positionals=(1, 1)),
}
GROUP_TRACKS = {"tpu-vm": ("GA", "alpha"), "queued-resources": ("GA", "alpha")}
# Answered by `describe` as gcloud's errors (exit 1), not as states.
DESCRIBE_ERRORS = {
    "NOT_FOUND": "NOT_FOUND: Resource '{path}' was not found",
    "PERMISSION_DENIED": "PERMISSION_DENIED: Permission 'tpu.nodes.get' denied on '{path}'",
}


def fail(command, message, status=2):
  sys.stderr.write(f"ERROR: ({command}) {message}\n")
  sys.exit(status)


def parse(command, argv, flags, allow_passthrough):
  """argparse as calliope does it: returns ({flag: [values]}, positionals, after '--')."""
  given, positionals, unknown = {}, [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--" and allow_passthrough:
      return given, positionals, argv[i + 1:]
    if arg.startswith("-") and arg != "-":
      name, eq, value = arg.partition("=")
      if name not in flags:
        unknown.append(arg)
      elif flags[name] is VALUE:
        if not eq:
          if i + 1 >= len(argv):
            fail(command, f"argument {name}: expected one argument")
          i += 1
          value = argv[i]
        given.setdefault(name, []).append(value)
      elif eq:
        fail(command, f"argument {name}: ignored explicit argument '{value}'")
      else:
        given.setdefault(name, []).append(True)
    else:
      positionals.append(arg)
    i += 1
  if unknown:
    fail(command, "unrecognized arguments: " + " ".join(unknown))
  return given, positionals, []


def check_compute_tpus(track, rest):
  """Refuses what gcloud's parser refuses; returns (group, verb, flags, positionals)."""
  prefix = "gcloud" + ("" if track == "GA" else "." + track) + ".compute.tpus"
  group = rest[2] if len(rest) > 2 else ""
  if track not in GROUP_TRACKS.get(group, ()):
    fail(prefix, f"Invalid choice: '{group}'.")
  verb = rest[3] if len(rest) > 3 else ""
  if (group, verb) not in COMMANDS:
    fail(f"{prefix}.{group}", f"Invalid choice: '{verb}'.")
  spec, command = COMMANDS[(group, verb)], f"{prefix}.{group}.{verb}"
  given, positionals, _ = parse(command, rest[4:], {**spec["tracks"][track], **WIDE},
                                allow_passthrough=verb == "ssh")
  least, most = spec["positionals"]
  if len(positionals) < least or (most is not None and len(positionals) > most):
    fail(command, f"expected {least}{'' if most == least else '+'} positional arguments, "
         f"got {positionals}")
  for options in spec.get("required", []):
    if not any(o in given for o in options):
      fail(command, f"Exactly one of ({' | '.join(options)}) must be specified.")
  for options in spec.get("exclusive", []):
    if sum(o in given for o in options) > 1:
      fail(command, f"argument {options[0]}: At most one of {' | '.join(options)} may be specified.")
  return group, verb, given, positionals, command


def local(d, url):
  """gs://BUCKET/PATH lives in FAKE_GCLOUD_DIR/gs/BUCKET/PATH."""
  return os.path.join(d, "gs", url[len("gs://"):]) if url.startswith("gs://") else url


def storage(d, rest):
  op, paths = rest[1], [a for a in rest[2:] if not a.startswith("-")]
  if op == "objects" and paths[0] == "describe":
    path = local(d, paths[1])
    if not os.path.isfile(path):
      sys.exit("ERROR: (gcloud.storage.objects.describe) The following URLs matched no objects "
               "or files:\n-" + paths[1])
    print(os.path.getsize(path))
  elif op == "cp":
    src, dst = local(d, paths[0]), local(d, paths[1])
    if not os.path.isfile(src):
      sys.exit("ERROR: (gcloud.storage.cp) URL matched no objects: " + paths[0])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
  elif op == "cat":
    if not os.path.isfile(local(d, paths[0])):
      sys.exit("ERROR: (gcloud.storage.cat) URL matched no objects: " + paths[0])
    with open(local(d, paths[0])) as f:
      sys.stdout.write(f.read())
  elif op == "ls":
    url = paths[0]
    if "*" in url:
      found = sorted(glob.glob(local(d, url)))
      urls = [url.rsplit("/", 1)[0] + "/" + os.path.basename(p) for p in found]
    else:
      base = url.rstrip("/") + "/"
      p = local(d, base)
      urls = [base + n + ("/" if os.path.isdir(os.path.join(p, n)) else "")
              for n in sorted(os.listdir(p))] if os.path.isdir(p) else []
    if not urls:
      sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
    print("\n".join(urls))


def describe(d, group, given, name, command):
  if any("acceleratorType" in f for f in given.get("--format", [])):
    print(os.environ.get("FAKE_GCLOUD_ACCELERATOR", "v4-8"))
    return
  path = os.path.join(d, "states." + ("queued" if group == "queued-resources" else "tpu-vm"))
  states = open(path).read().split() if os.path.exists(path) else ["NOT_FOUND"]
  if len(states) > 1:
    with open(path, "w") as f:
      f.write("\n".join(states[1:]))
  if states[0] in DESCRIBE_ERRORS:
    kind = "queuedResources" if group == "queued-resources" else "nodes"
    resource = f"projects/fake-project/locations/{given['--zone'][0]}/{kind}/{name}"
    fail(command, DESCRIBE_ERRORS[states[0]].format(path=resource), status=1)
  print(states[0])


def workers_of(given):
  worker = given.get("--worker", ["0"])[0]
  n = int(os.environ.get("FAKE_GCLOUD_WORKERS", "1"))
  return list(range(n)) if worker == "all" else [int(w) for w in worker.split(",")]


def check_key_in_agent(command):
  """gcloud's VerifyKeyInAgent, run for scp to several workers."""
  key = os.path.expanduser("~/.ssh/google_compute_engine")
  if not os.environ.get("SSH_AUTH_SOCK") or not os.path.exists(key):
    return
  keygen = subprocess.run(["ssh-keygen", "-lf", key], capture_output=True, text=True)
  listed = subprocess.run(["ssh-add", "-l"], capture_output=True, text=True)
  if keygen.returncode or listed.returncode:
    return  # gcloud only warns then
  if keygen.stdout.split()[1] not in listed.stdout:
    fail(command, f'SSH Key is not present in the SSH agent. Please run "ssh-add {key}" '
         "to add it, and try again.", status=1)


def play_workers(node, user, given):
  """Runs an ssh --command on the played workers of `node`, one after the other."""
  cmd = given["--command"][0]
  if "uv venv" in cmd:
    return 0
  rc = 0
  for i in workers_of(given):
    home = os.path.join(os.environ["FAKE_GCLOUD_WORKER_HOME"], user, f"{node}-w{i}")
    fakebin = os.path.join(home, ".fakebin")
    os.makedirs(fakebin, exist_ok=True)
    for tool, body in (("hostname", f"echo t1v-n-{node}-w-{i}"),
                       ("sudo", 'if [ "$1" = -n ]; then shift; fi; exec "$@"')):
      with open(os.path.join(fakebin, tool), "w") as f:
        f.write(f"#!/bin/sh\n{body}\n")
      os.chmod(os.path.join(fakebin, tool), 0o755)
    env = dict(os.environ, HOME=home, PATH=fakebin + os.pathsep + os.environ["PATH"],
               MINIEND_TPU_CHIP_ROOT=os.path.join(home, ".root"))
    rc = subprocess.run(["bash", "-c", cmd], env=env).returncode or rc
  return rc


def new_vms(node):
  """What a re-created TPU leaves of the played workers' runs: nothing."""
  for logs in glob.glob(os.path.join(os.environ.get("FAKE_GCLOUD_WORKER_HOME", "/nonexistent"),
                                     "*", f"{node}*-w*", "miniend_logs")):
    for pid_file in glob.glob(os.path.join(logs, "*.pid")):
      try:
        os.killpg(int(open(pid_file).read()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass
    shutil.rmtree(logs)


def main():
  d = os.environ["FAKE_GCLOUD_DIR"]
  args = sys.argv[1:]
  track, rest = ("GA", args)
  if args and args[0] in ("alpha", "beta"):
    track, rest = args[0], args[1:]
  if rest[:2] == ["compute", "tpus"]:
    group, verb, given, positionals, command = check_compute_tpus(track, rest)
  elif rest[:1] == ["storage"] and track == "GA":
    group = verb = command = None
  else:
    fail("gcloud", f"Invalid choice: {rest[:2]} (the stand-in plays compute tpus and storage)")
  with open(os.path.join(d, "calls.log"), "a") as f:
    f.write(json.dumps(args) + "\n")
  if group is None:
    storage(d, rest)
    return
  unreachable = os.path.join(d, "unreachable")
  if verb == "describe":
    describe(d, group, given, positionals[0], command)
  elif verb == "create":
    if os.path.exists(unreachable):
      os.remove(unreachable)
    new_vms(positionals[0])
  elif verb in ("ssh", "scp") and os.path.exists(unreachable):
    sys.exit("ssh: connect to host 10.0.0.2 port 22: Connection timed out")
  elif verb == "scp":
    if len(workers_of(given)) > 1 and "--dry-run" not in given:
      check_key_in_agent(command)
    if os.environ.get("FAKE_GCLOUD_SCP_TO"):
      subprocess.run(["cp", "-R", positionals[0], os.environ["FAKE_GCLOUD_SCP_TO"]], check=True)
  elif verb == "ssh" and os.environ.get("FAKE_GCLOUD_WORKER_HOME"):
    user, _, node = positionals[0].rpartition("@")
    sys.exit(play_workers(node, user or getpass.getuser(), given))


if __name__ == "__main__":
  main()
