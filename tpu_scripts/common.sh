# shellcheck shell=bash
# Shared helpers for the tpu_scripts/*.sh launchers. Sourced, never run.
#
# What lives here:
#   - die / usage_error / require_flag: clear errors that name the flag and show an example
#   - flag_value / common_flag / resolve_existing_tpu: the flags every script shares
#   - run: echo the exact command in --dry-run, execute it otherwise
#   - gcloud_tpu: every gcloud call goes through it so --zone/--project are never forgotten
#   - node_ssh / node_scp: ssh and scp as the recorded remote user, through IAP (gcloud's
#     alpha track) when asked
#   - describe_state / state_class: what the TPU API says, and what that means here
#   - a small per-TPU state file (~/.miniend_tpu/<name>.env) so resume.sh can replay
#     create/setup/launch with the same flags after a preemption
#   - accelerator-type helpers (default runtime image, number of hosts)
#
# NAME, ZONE, PROJECT and MODE are set by the script that sources this file, which also
# uses the REMOTE_* paths; those are literal '$HOME/...' strings, expanded on the workers.
# shellcheck disable=SC2034,SC2153,SC2016

# Empty arrays under `set -u`, `declare -g` and `read -d ''` need bash >= 4.4.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$(basename "$0"): error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

# The gcloud binary; tests put a fake one first on PATH, users may point at another.
GCLOUD=${GCLOUD:-gcloud}
# Where per-TPU flags are remembered between scripts (overridable for tests / CI).
MINIEND_TPU_STATE_DIR=${MINIEND_TPU_STATE_DIR:-$HOME/.miniend_tpu}
# Paths on the TPU workers.
REMOTE_SRC='$HOME/miniend_jax'
REMOTE_VENV='$HOME/miniend_venv'
REMOTE_LOGS='$HOME/miniend_logs'
REMOTE_WHEELS='$HOME/miniend_wheels'

DRY_RUN=0
SCRIPT_NAME=$(basename "$0")

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

# Usage errors exit 2 (like argparse) and point at --help.
usage_error() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run '$SCRIPT_NAME --help' for usage." >&2
  exit 2
}

info() {
  echo "$SCRIPT_NAME: $*" >&2
}

# require_flag VALUE FLAG EXAMPLE: fail naming the flag when VALUE is empty.
require_flag() {
  if [[ -z "$1" ]]; then
    usage_error "missing required flag $2 (e.g. $2 $3)"
  fi
}

# need_value FLAG NUM_REMAINING_ARGS: a flag given as the last argument has no value.
need_value() {
  if (( $2 < 2 )); then
    usage_error "flag $1 needs a value"
  fi
}

# flag_value "$@": the value of a flag given as '--flag VALUE' or '--flag=VALUE' goes to
# FLAG_VALUE, and FLAG_SHIFT says how many arguments it took.
flag_value() {
  if [[ "$1" == *=* ]]; then
    FLAG_VALUE=${1#*=} FLAG_SHIFT=1
  else
    need_value "$1" $#
    FLAG_VALUE=$2 FLAG_SHIFT=2
  fi
}

# common_flag "$@": the flags every script takes (-h/--help, --name, --zone, --project,
# --dry-run); anything else is an unknown argument (UNKNOWN_FLAG_HINT is appended to that
# error). Each script's loop matches its own flags first, then calls this and shifts
# FLAG_SHIFT arguments.
common_flag() {
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name | --name=*) flag_value "$@"; NAME=$FLAG_VALUE ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$FLAG_VALUE ;;
    --project | --project=*) flag_value "$@"; PROJECT=$FLAG_VALUE ;;
    --dry-run) DRY_RUN=1 FLAG_SHIFT=1 ;;
    *) usage_error "unknown argument '$1'${UNKNOWN_FLAG_HINT:-}" ;;
  esac
}

# shell_quote ARG...: quote for a POSIX shell, leaving plain words readable
# (so --dry-run output is copy-pasteable and still easy to read).
shell_quote() {
  local out=() a
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# run CMD...: in --dry-run print the command (one line, quoted) on stdout and do
# nothing; otherwise show it on stderr (so users see what happens) and run it.
run() {
  if (( DRY_RUN )); then
    shell_quote "$@"
  else
    echo "+ $(shell_quote "$@")" >&2
    "$@"
  fi
}

# Extra gcloud flags applied to every call (e.g. --project). Set by load_common_flags.
GCLOUD_FLAGS=()

# gcloud_tpu SUBCOMMAND...: `gcloud compute tpus SUBCOMMAND... --zone Z [--project P]`.
gcloud_tpu() {
  run "$GCLOUD" compute tpus "$@" --zone "$ZONE" "${GCLOUD_FLAGS[@]}"
}

# ---------------------------------------------------------------- reaching the workers

# SSH_FLAGS: extra flags for every ssh/scp, from MINIEND_TPU_SSH_FLAGS (word-split on
# purpose), e.g. '--tunnel-through-iap' (IAP) or '--internal-ip' (from inside the VPC).
# SSH_TRACK: gcloud's release track for ssh/scp. `tpu-vm ssh|scp --tunnel-through-iap`
# exists only in the alpha track (GA has --internal-ip alone; there is no beta tpu-vm).
# REMOTE_USER: the login on the workers, recorded once, so that scripts run from another
# local login (resume.sh --watch under cron, a colleague) find the same home there.
SSH_FLAGS=() SSH_TRACK=() REMOTE_USER=""

# local_login: the user gcloud ssh would pick by default (Python's getpass.getuser()).
local_login() {
  echo "${LOGNAME:-${USER:-${LNAME:-${USERNAME:-$(id -un)}}}}"
}

# resolve_remote_access: set SSH_FLAGS, SSH_TRACK and REMOTE_USER from the environment,
# else what the state file recorded (TPU_SSH_FLAGS, REMOTE_USER), else the defaults: IAP
# for a TPU created with --internal-ips (no external IP to reach), the local login.
resolve_remote_access() {
  local flags
  REMOTE_USER=${REMOTE_USER:-$(local_login)}
  if [[ -n "${MINIEND_TPU_SSH_FLAGS+x}" ]]; then
    flags=$MINIEND_TPU_SSH_FLAGS
  elif [[ -n "${TPU_SSH_FLAGS+x}" ]]; then
    flags=$TPU_SSH_FLAGS
  elif [[ "${CREATE_INTERNAL_IPS:-0}" == 1 ]]; then
    flags=--tunnel-through-iap
  else
    flags=""
  fi
  read -r -a SSH_FLAGS <<<"$flags"
  SSH_TRACK=()
  if [[ " ${SSH_FLAGS[*]} " == *" --tunnel-through-iap "* ]]; then SSH_TRACK=(alpha); fi
}

# remember_remote_access NAME: record REMOTE_USER, and MINIEND_TPU_SSH_FLAGS when set.
remember_remote_access() {
  local keys=(REMOTE_USER)
  if ((DRY_RUN)); then return; fi
  if [[ -n "${MINIEND_TPU_SSH_FLAGS+x}" ]]; then
    TPU_SSH_FLAGS=$MINIEND_TPU_SSH_FLAGS
    keys+=(TPU_SSH_FLAGS)
  fi
  state_save "$1" "${keys[@]}"
}

# gcloud_tpu_remote ssh|scp ARG...: `gcloud [alpha] compute tpus tpu-vm ssh|scp ARG...`
# with the ssh flags, zone and project.
gcloud_tpu_remote() {
  local verb=$1
  shift
  run "$GCLOUD" "${SSH_TRACK[@]}" compute tpus tpu-vm "$verb" "$@" "${SSH_FLAGS[@]}" \
    --zone "$ZONE" "${GCLOUD_FLAGS[@]}"
}

# ensure_ssh_key_in_agent: gcloud refuses scp to several workers when an ssh-agent with
# keys runs without gcloud's own key ("SSH Key is not present in the SSH agent"): add it.
ensure_ssh_key_in_agent() {
  local key=$HOME/.ssh/google_compute_engine listed fingerprint
  if ((DRY_RUN)) || [[ ! -f "$key" ]]; then return 0; fi
  # No agent, or one without keys: gcloud only warns then; nothing to add.
  listed=$(ssh-add -l 2>/dev/null) || return 0
  fingerprint=$(ssh-keygen -lf "$key" 2>/dev/null) || return 0
  fingerprint=$(awk '{print $2}' <<<"$fingerprint")
  if [[ -z "$fingerprint" || "$listed" == *"$fingerprint"* ]]; then return 0; fi
  info "adding $key to your ssh-agent (gcloud copies to several workers only with it there)"
  ssh-add "$key" </dev/null ||
    die "gcloud copies to several TPU workers only with its key in your ssh-agent, and ssh-add could not add it: run 'ssh-add $key', then run this again"
}

# ---------------------------------------------------------------- nodes (slices)

# How many TPU nodes (slices) NAME has: 1, or N for a multi-slice queued resource made by
# `create.sh --node-count N`, whose nodes gcloud names NAME-0 ... NAME-(N-1) (--node-prefix).
NODE_COUNT=1

# node_name I: the TPU node of slice I (NAME itself when there is one slice).
node_name() {
  if ((NODE_COUNT > 1)); then echo "$NAME-$1"; else echo "$NAME"; fi
}

# node_names: the TPU node names of NAME, one a line.
node_names() {
  local i
  for ((i = 0; i < NODE_COUNT; i++)); do node_name "$i"; done
}

# each_node FN ARG...: `FN NODE ARG...` for every node. Several nodes run in parallel (a
# multi-slice job starts, and checks its devices, only with every slice at once); fails
# when any of them failed.
each_node() {
  local fn=$1 node pids=() pid rc=0
  shift
  if ((NODE_COUNT <= 1)); then
    "$fn" "$NAME" "$@"
    return
  fi
  for node in $(node_names); do
    if ((DRY_RUN)); then
      "$fn" "$node" "$@"
    else
      "$fn" "$node" "$@" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || rc=1
  done
  return "$rc"
}

# node_ssh NODE WORKER REMOTE_COMMAND: run REMOTE_COMMAND on one worker of NODE or on all.
node_ssh() {
  gcloud_tpu_remote ssh "$REMOTE_USER@$1" --worker="$2" --command "$3"
}

# node_scp NODE LOCAL_DIR REMOTE_DIR: copy LOCAL_DIR to ~/REMOTE_DIR on every worker of NODE.
node_scp() {
  gcloud_tpu_remote scp --recurse "$2" "$REMOTE_USER@$1:$3" --worker=all
}

# tpu_ssh WORKER REMOTE_COMMAND: node_ssh on every node.
tpu_ssh() {
  each_node node_ssh "$@"
}

# ---------------------------------------------------------------- run files

# remote_run_file EXT: a worker's file for the run launched on NAME: log (its output), pid
# (the launch wrapper's process group), exit (miniend's exit status, written when it ends).
remote_run_file() {
  echo "$REMOTE_LOGS/$NAME.$1"
}

# The bucket copy of each worker's log: WORKDIR/logs/workers/NODE-wN.log, N the worker
# number read from the TPU VM host name (t1v-n-...-w-N), else NODE-HOSTNAME.log.
bucket_logs_dir() {
  echo "${1%/}/logs/workers"
}

# ---------------------------------------------------------------- names and flags

# TPU names become file names and remote paths; GCP allows lowercase, digits and '-'.
validate_name() {
  if [[ ! "$1" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]]; then
    usage_error "invalid --name '$1': use lowercase letters, digits and '-', starting with a letter (e.g. --name miniend-v4-8)"
  fi
}

# ---------------------------------------------------------------- state file

state_file() {
  echo "$MINIEND_TPU_STATE_DIR/$1.env"
}

# state_load NAME: source the state file if there is one; returns 1 when absent.
state_load() {
  local f
  f=$(state_file "$1")
  [[ -f "$f" ]] || return 1
  # shellcheck disable=SC1090
  source "$f"
}

# state_save NAME VAR...: (re)write the named variables (scalars or arrays) in the
# state file, keeping the others (create, setup and launch each own their keys).
state_save() {
  local name=$1 f tmp var decl flags
  shift
  f=$(state_file "$name")
  mkdir -p "$MINIEND_TPU_STATE_DIR"
  tmp=$(mktemp "$f.XXXXXX")
  if [[ -f "$f" ]]; then
    cp "$f" "$tmp"
  else
    echo "# miniend tpu_scripts state for TPU '$name' (written by create/setup/launch; read by resume)" >"$tmp"
  fi
  for var in "$@"; do
    # Drop the old definition, then append `declare -p` output, which bash re-reads
    # exactly (arrays and quoting included). `-g` so sourcing inside a function sets globals.
    grep -v -E "^declare -[-a-zA-Z]* $var=" "$tmp" >"$tmp.new" || true
    mv "$tmp.new" "$tmp"
    decl=$(declare -p "$var")
    decl=${decl#declare -}
    flags=${decl%% *}
    echo "declare -g${flags//-/} ${decl#* }" >>"$tmp"
  done
  mv "$tmp" "$f"
}

# ---------------------------------------------------------------- flags of an existing TPU

# set_gcloud_flags: derive the per-call gcloud flags from PROJECT.
set_gcloud_flags() {
  GCLOUD_FLAGS=()
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_FLAGS=(--project "$PROJECT")
  fi
}

# load_defaults_from_state: for scripts run after create.sh, fill --zone/--project/mode
# from the state file so users only pass --name (flags given explicitly win), and how to
# reach the workers (resolve_remote_access).
load_defaults_from_state() {
  local zone=$ZONE project=$PROJECT
  if state_load "$NAME"; then
    ZONE=${zone:-${CREATE_ZONE:-}}
    PROJECT=${project:-${CREATE_PROJECT:-}}
    if [[ "${CREATE_QUEUED:-0}" == 1 ]]; then MODE=queued; else MODE=vm; fi
    NODE_COUNT=${CREATE_NODE_COUNT:-1}
  fi
  resolve_remote_access
}

# resolve_existing_tpu: for the scripts run after create.sh: --name is required and valid,
# and --zone/--project/mode default to what create.sh recorded.
resolve_existing_tpu() {
  require_flag "$NAME" --name miniend-v4-8
  validate_name "$NAME"
  load_defaults_from_state
  require_flag "$ZONE" --zone us-central2-b
}

# ---------------------------------------------------------------- accelerator types

# default_runtime_version ACCELERATOR_TYPE: the TPU VM image for that generation.
# See https://cloud.google.com/tpu/docs/runtimes (JAX uses the plain base images).
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# num_hosts ACCELERATOR_TYPE: how many TPU VM workers a slice has.
# v2/v3/v4/v5p suffixes count TensorCores, 8 per host (v4-8 = 1 host, v5p-32 = 4);
# v5e/v6e suffixes count chips: up to 8 on one host, then 4 chips per host.
num_hosts() {
  local gen=${1%-*} n=${1##*-}
  [[ "$n" =~ ^[0-9]+$ ]] || return 1
  case "$gen" in
    v2 | v3 | v4 | v5p) echo $(((n + 7) / 8)) ;;
    v5litepod | v5e | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) return 1 ;;
  esac
}

# devices_per_host ACCELERATOR_TYPE: how many JAX devices each worker has: v2/v3 one per
# TensorCore (8 a host); v4/v5p one per chip (megacore: 4 a host, 2 cores each); v5e/v6e
# one per chip (all of them up to 8 chips, else 4 a host).
devices_per_host() {
  local gen=${1%-*} n=${1##*-}
  [[ "$n" =~ ^[0-9]+$ ]] || return 1
  case "$gen" in
    v2 | v3) echo 8 ;;
    v4 | v5p) if ((n < 8)); then echo $((n / 2)); else echo 4; fi ;;
    v5litepod | v5e | v6e) if ((n <= 8)); then echo "$n"; else echo 4; fi ;;
    *) return 1 ;;
  esac
}

# resolve_accelerator: ACCEL, the accelerator type create.sh recorded (or given), else the
# one gcloud describes; empty when neither is known (dry run without state).
resolve_accelerator() {
  ACCEL=${ACCEL:-${CREATE_ACCELERATOR_TYPE:-}}
  if [[ -z "$ACCEL" ]] && ! ((DRY_RUN)); then
    ACCEL=$("$GCLOUD" compute tpus tpu-vm describe "$(node_name 0)" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
      --format='value(acceleratorType)' 2>/dev/null) || ACCEL=""
  fi
}

# ---------------------------------------------------------------- TPU states

# describe_state: STATE, what the TPU API says of the node (VM mode) or queued resource,
# or NOT_FOUND when gcloud says it does not exist. Any other gcloud error (expired
# credentials, a permission, the API disabled) stops here with gcloud's own message:
# guessing NOT_FOUND would have resume.sh create over a TPU it cannot see.
describe_state() {
  local err rc=0
  err=$(mktemp "${TMPDIR:-/tmp}/miniend_describe.XXXXXX")
  if [[ "$MODE" == queued ]]; then
    STATE=$("$GCLOUD" compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
      --format='value(state.state)' 2>"$err") || rc=$?
  else
    STATE=$("$GCLOUD" compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
      --format='value(state)' 2>"$err") || rc=$?
  fi
  if ((rc != 0)); then
    if grep -q -E 'NOT_FOUND|was not found' "$err"; then
      STATE=NOT_FOUND
    else
      echo "$SCRIPT_NAME: error: cannot read the state of $NAME (gcloud exit status $rc):" >&2
      cat "$err" >&2
      rm -f "$err"
      exit 1
    fi
  fi
  rm -f "$err"
  STATE=${STATE:-STATE_UNSPECIFIED}
}

# The gcloud describe command describe_state runs, for --dry-run output.
describe_command() {
  if [[ "$MODE" == queued ]]; then
    shell_quote "$GCLOUD" compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
      --format='value(state.state)'
  else
    shell_quote "$GCLOUD" compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
      --format='value(state)'
  fi
}

# ready_state: what describe says once the TPU can be used.
ready_state() {
  if [[ "$MODE" == queued ]]; then echo ACTIVE; else echo READY; fi
}

# Every state of the TPU API (v2) by what it means for a run, VM nodes then queued
# resources (the NAME of `create.sh --queued`):
#   ready    usable: READY / ACTIVE
#   pending  on its way to ready by itself: wait
#   gone     lost or on its way out, never ready again: (wait until it has settled,)
#            delete what is left, create it again
#   failed   broken: UNKNOWN is a node after a failed repair, FAILED a queued resource
#            that could not be provisioned; STATE_UNSPECIFIED says nothing: delete it and
#            create it again, like gone
# NOT_FOUND (describe_state) is gone with nothing left to delete. A state missing here
# (a newer API) is "unknown": no guess; resume.sh --watch counts that round as failed.
NODE_STATES="ready:READY pending:CREATING pending:STARTING pending:RESTARTING pending:REPAIRING
  pending:REIMAGING pending:UNHIDING gone:PREEMPTED gone:TERMINATED gone:STOPPED gone:STOPPING
  gone:HIDING gone:HIDDEN gone:DELETING gone:NOT_FOUND failed:UNKNOWN failed:STATE_UNSPECIFIED"
QUEUED_STATES="ready:ACTIVE pending:CREATING pending:ACCEPTED pending:WAITING_FOR_RESOURCES
  pending:PROVISIONING gone:SUSPENDING gone:SUSPENDED gone:DELETING gone:NOT_FOUND
  failed:FAILED failed:STATE_UNSPECIFIED"
# Gone states that are still changing: wait for them to settle before deleting/creating.
SETTLING_STATES="STOPPING HIDING SUSPENDING DELETING"

# state_class STATE: ready, pending, gone, failed or unknown (see above), for MODE.
state_class() {
  local table=$NODE_STATES entry
  if [[ "$MODE" == queued ]]; then table=$QUEUED_STATES; fi
  for entry in $table; do
    if [[ "${entry#*:}" == "$1" ]]; then
      echo "${entry%%:*}"
      return
    fi
  done
  echo unknown
}

# wait_until_ready TIMEOUT POLL_INTERVAL: poll describe until READY (queued: ACTIVE).
# Queued resources pass through ACCEPTED/WAITING_FOR_RESOURCES/PROVISIONING (hours, for
# big slices); TPU VMs through CREATING. Fails fast on gone and failed states, and after
# TIMEOUT seconds (0 = never) with a message saying what to do next.
wait_until_ready() {
  local timeout=$1 interval=$2 want last="" start=$SECONDS
  want=$(ready_state)
  info "waiting for $NAME to become $want (timeout ${timeout}s; 0 = none)"
  while :; do
    describe_state
    if [[ "$STATE" != "$last" ]]; then
      info "$NAME: $STATE"
      last=$STATE
    fi
    case "$(state_class "$STATE")" in
      ready) return 0 ;;
      gone | failed)
        die "$NAME entered state $STATE while waiting for $want. Check with: $(describe_command). Delete it with: tpu_scripts/teardown.sh --name $NAME" ;;
    esac
    if ((timeout > 0 && SECONDS - start >= timeout)); then
      die "timed out after ${timeout}s waiting for $NAME to become $want (last state: $STATE). It may still come up: check with: $(describe_command); or retry with a larger --timeout; or delete it with: tpu_scripts/teardown.sh --name $NAME"
    fi
    sleep "$interval"
  done
}

# wait_until_settled TIMEOUT POLL_INTERVAL: poll describe while the state is one of
# SETTLING_STATES (a stop, hide, suspension or deletion under way); STATE is the next one.
wait_until_settled() {
  local timeout=$1 interval=$2 start=$SECONDS
  while [[ " $SETTLING_STATES " == *" $STATE "* ]]; do
    if ((timeout > 0 && SECONDS - start >= timeout)); then
      die "timed out after ${timeout}s waiting for $NAME to leave state $STATE. Check with: $(describe_command)"
    fi
    info "$NAME is $STATE: waiting for that to finish"
    sleep "$interval"
    describe_state
  done
}
