#!/usr/bin/env bash
# Install miniend_jax on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: setup.sh --name NAME (--repo URL [--ref REF] | --scp-local) [options]

On every worker (--worker=all; of every slice of a multi-slice TPU, all at once): get the
code into ~/miniend_jax, create the virtual environment ~/miniend_venv with
`pip install -c constraints.txt -e '.[tpu]'` (jax[tpu], with jax, libtpu, flax, optax and
orbax pinned to the tested set, so a re-created TPU gets the same ones), then check, as a
step of its own, that JAX runs on the TPU (JAX_PLATFORMS=tpu: no quiet fallback to the
CPU) with as many devices on each worker as the accelerator type has.
Safe to run again (e.g. to update the code before a new launch).

Required:
  --name NAME           TPU node name given to create.sh
  and one source of code:
  --repo URL            git URL of a miniend_jax repository the workers can clone (your fork
                        or mirror; a private one needs credentials on the workers)
  --scp-local           copy this local checkout instead (tracked and untracked files
                        that git does not ignore, so .venv/ and caches stay behind), with
                        `gcloud compute tpus tpu-vm scp --recurse --worker=all`
                        (after a first run, setup.sh --name NAME reuses the same choice)

Options:
  --ref REF             branch, tag or commit to check out with --repo (default: the
                        remote's default branch)
  --python VERSION      Python for the venv (default 3.11; the TPU images ship Ubuntu
                        22.04's Python 3.10, too old, so uv installs a standalone one)
  --wheelhouse GS_DIR   install from the wheels in GS_DIR (gs://BUCKET/miniend_wheels; pip
                        --no-index): no PyPI needed, the same files on every (re)install.
                        Build it with the command in tpu_scripts/README.md.
  --skip-verify         Do not check that JAX sees the TPU (remembered, like the source)
  --zone ZONE           default: as given to create.sh
  --project PROJECT     default: as given to create.sh
  --dry-run             Print the gcloud commands instead of running them
  -h, --help            Show this help

Environment: MINIEND_TPU_SSH_FLAGS adds flags to every ssh/scp (e.g. '--tunnel-through-iap',
which goes through gcloud's alpha track); remembered for NAME.

Examples:
  # YOUR_FORK is a placeholder: use a repository the TPU workers can reach.
  tpu_scripts/setup.sh --name miniend-v4-8 --repo https://github.com/YOUR_FORK/miniend_jax.git --ref main
  tpu_scripts/setup.sh --name miniend-v5p-32 --scp-local
EOF
}

NAME="" ZONE="" PROJECT="" MODE=vm REPO="" REF="" SCP_LOCAL=0 PYTHON_VERSION="" VERIFY="" WHEELHOUSE=""
while (($#)); do
  case "$1" in
    --repo | --repo=*) flag_value "$@"; REPO=$FLAG_VALUE ;;
    --ref | --ref=*) flag_value "$@"; REF=$FLAG_VALUE ;;
    --python | --python=*) flag_value "$@"; PYTHON_VERSION=$FLAG_VALUE ;;
    --scp-local) SCP_LOCAL=1 FLAG_SHIFT=1 ;;
    --wheelhouse | --wheelhouse=*) flag_value "$@"; WHEELHOUSE=$FLAG_VALUE ;;
    --skip-verify) VERIFY=0 FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

resolve_existing_tpu
set_gcloud_flags

# No source given: reuse the one recorded by the previous setup (resume.sh relies on this).
if [[ -z "$REPO" ]] && ((!SCP_LOCAL)); then
  REPO=${SETUP_REPO:-}
  REF=${REF:-${SETUP_REF:-}}
  SCP_LOCAL=${SETUP_SCP_LOCAL:-0}
fi
if [[ -n "$REPO" ]] && ((SCP_LOCAL)); then
  usage_error "--repo and --scp-local are mutually exclusive"
fi
if [[ -z "$REPO" ]] && ((!SCP_LOCAL)); then
  usage_error "missing required flag --repo URL (a git URL of miniend_jax the workers can clone) or --scp-local (copy this checkout)"
fi
if [[ -n "$REF" && -z "$REPO" ]]; then
  usage_error "--ref only applies with --repo"
fi
PYTHON_VERSION=${PYTHON_VERSION:-${SETUP_PYTHON:-3.11}}
VERIFY=${VERIFY:-${SETUP_VERIFY:-1}} ACCEL=""
WHEELHOUSE=${WHEELHOUSE:-${SETUP_WHEELHOUSE:-}}
if [[ -n "$WHEELHOUSE" && "$WHEELHOUSE" != gs://* ]]; then
  usage_error "--wheelhouse must be a gs:// directory the workers can read, got '$WHEELHOUSE'"
fi
# --scp-local copies the checkout these scripts live in.
LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if ! ((DRY_RUN)); then
  # shellcheck disable=SC2034  # saved by name
  SETUP_REPO=$REPO SETUP_REF=$REF SETUP_SCP_LOCAL=$SCP_LOCAL SETUP_PYTHON=$PYTHON_VERSION
  # shellcheck disable=SC2034
  SETUP_VERIFY=$VERIFY SETUP_WHEELHOUSE=$WHEELHOUSE
  state_save "$NAME" SETUP_REPO SETUP_REF SETUP_SCP_LOCAL SETUP_PYTHON SETUP_VERIFY SETUP_WHEELHOUSE
  remember_remote_access "$NAME"
fi

# ------------------------------------------------------------------ the remote script
# One line of ';'-separated shell run by the workers' login shell (bash on TPU images).
steps=("set -euo pipefail"
  # uv's installer uses ~/.local/bin (older ones ~/.cargo/bin).
  "export PATH=\"\$HOME/.local/bin:\$HOME/.cargo/bin:\$PATH\"")
if [[ -n "$REPO" ]]; then
  # Fetch REF into an existing clone or a fresh one: works for branches, tags and
  # commits, and re-running setup updates the code in place.
  steps+=("if [ ! -d \"$REMOTE_SRC/.git\" ]; then rm -rf \"$REMOTE_SRC\"; git clone --quiet $(shell_quote "$REPO") \"$REMOTE_SRC\"; fi"
    "git -C \"$REMOTE_SRC\" fetch --quiet origin $(shell_quote "${REF:-HEAD}")"
    "git -C \"$REMOTE_SRC\" checkout --quiet --force FETCH_HEAD")
fi
# pip's flags: the tested set's pins (constraints.txt, when the checked-out code has it),
# and with --wheelhouse no index at all.
pip_flags="\$([ -f constraints.txt ] && echo -c constraints.txt)"
uv_source="python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
if [[ -n "$WHEELHOUSE" ]]; then
  steps+=("mkdir -p \"$REMOTE_WHEELS\""
    "gcloud storage rsync --quiet $(shell_quote "${WHEELHOUSE%/}") \"$REMOTE_WHEELS\"")
  pip_flags="--no-index --find-links \"$REMOTE_WHEELS\" $pip_flags"
  uv_source="python3 -m pip install --user --quiet --no-index --find-links \"$REMOTE_WHEELS\" uv"
fi
steps+=("cd \"$REMOTE_SRC\""
  # miniend_jax needs Python >= 3.11; uv provides one without sudo or PPAs.
  "if ! command -v uv >/dev/null 2>&1; then $uv_source; fi"
  "if [ ! -x \"$REMOTE_VENV/bin/python\" ]; then uv venv --quiet --seed --python $(shell_quote "$PYTHON_VERSION") \"$REMOTE_VENV\"; fi"
  "\"$REMOTE_VENV/bin/pip\" install --quiet $pip_flags --upgrade pip"
  "\"$REMOTE_VENV/bin/pip\" install --quiet $pip_flags -e '.[tpu]'")
install_cmd=$(printf '%s; ' "${steps[@]}")
install_cmd=${install_cmd%; }

# The check, run on every worker at once (a pod slice's TPU runtime starts only with all
# of them): JAX_PLATFORMS=tpu, so a busy or broken TPU is an error, not a quiet CPU
# fallback; the local devices must be TPUs, as many as the accelerator type puts on a host.
# Arguments: the host name, the platform and the device count wanted (0: any).
# shellcheck disable=SC2016  # Python, not shell
VERIFY_PY='import sys
host, platform, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    import jax
    devices = jax.local_devices()
except Exception as e:  # what JAX says when it cannot start the TPU
    sys.exit(f"{host}: JAX cannot use the TPU: {str(e).strip().splitlines()[0]}")
kinds = ", ".join(sorted({d.device_kind for d in devices}))
print(f"{host}: {len(devices)} {devices[0].platform} devices ({kinds}); {jax.device_count()} in all")
wanted = want or "some"
if devices[0].platform != platform or (want and len(devices) != want):
    sys.exit(f"{host}: expected {wanted} {platform} devices here, found "
             f"{len(devices)} {devices[0].platform}")'
per_host=0
if ((VERIFY)); then
  resolve_accelerator
  per_host=$(devices_per_host "$ACCEL" 2>/dev/null) || per_host=0
fi
pid_file=$(remote_run_file pid)
verify_cmd="if [ -f \"$pid_file\" ] && kill -0 \"\$(cat \"$pid_file\")\" 2>/dev/null; then echo \"\$(hostname): miniend runs here and holds the TPU: not checked\"; exit 0; fi; cd \"$REMOTE_SRC\" && JAX_PLATFORMS=tpu \"$REMOTE_VENV/bin/python\" -c $(shell_quote "$VERIFY_PY") \"\$(hostname)\" tpu $per_host"

# ------------------------------------------------------------------ run it
if ((SCP_LOCAL)); then
  if ((DRY_RUN)); then
    echo "# stage the tracked + untracked (not ignored) files of $LOCAL_DIR into STAGING_DIR/miniend_jax"
    stage="STAGING_DIR"
  else
    git -C "$LOCAL_DIR" rev-parse --git-dir >/dev/null 2>&1 ||
      die "--scp-local needs $LOCAL_DIR to be a git checkout (git decides what to copy, so .venv/ and caches stay behind)"
    stage=$(mktemp -d "${TMPDIR:-/tmp}/miniend_stage.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir "$stage/miniend_jax"
    # Files deleted in the working tree are still listed by --cached: skip them.
    while IFS= read -r -d '' f; do
      if [[ -e "$LOCAL_DIR/$f" || -L "$LOCAL_DIR/$f" ]]; then printf '%s\0' "$f"; fi
    done < <(git -C "$LOCAL_DIR" ls-files -z --cached --others --exclude-standard) >"$stage/files"
    tar -C "$LOCAL_DIR" --null -T "$stage/files" -cf - | tar -C "$stage/miniend_jax" -xf -
    info "copying $(tr -cd '\0' <"$stage/files" | wc -c | tr -d ' ') files from $LOCAL_DIR"
  fi
  # Start from an empty directory so files deleted locally do not linger remotely.
  tpu_ssh all "rm -rf \"$REMOTE_SRC\""
  ensure_ssh_key_in_agent
  each_node node_scp "$stage/miniend_jax" miniend_jax
fi
tpu_ssh all "$install_cmd"
if ((VERIFY)); then
  info "checking that JAX uses the TPU on every worker ($per_host devices each; 0 = not known)"
  tpu_ssh all "$verify_cmd" ||
    die "the TPU check failed on a worker (above). Another process holding the TPU: launch.sh --restart stops whatever holds it before it launches; a broken TPU: tpu_scripts/resume.sh --name $NAME --recreate"
fi
if ! ((DRY_RUN)); then
  info "setup done on every worker of $NAME. Next: tpu_scripts/launch.sh --name $NAME --workdir gs://BUCKET/RUN -- distill ..."
fi
