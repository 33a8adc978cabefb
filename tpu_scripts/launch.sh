#!/usr/bin/env bash
# Start `miniend <command> ...` on every worker of a TPU VM / pod slice / slices, detached.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch.sh --name NAME --workdir DIR [options] -- MINIEND_COMMAND [MINIEND_FLAGS...]

Run `miniend MINIEND_COMMAND ...` on every worker at once (--worker=all; every slice of a
multi-slice TPU), under setsid + nohup so it keeps running after ssh disconnects. Each
worker logs to its own ~/miniend_logs/NAME.log (follow with tpu_scripts/logs.sh --name NAME)
and, with a gs:// work directory, copies it to DIR/logs/workers/NODE-wN.log every
--log-sync seconds and when miniend exits, so the log outlives the VM. Its exit status goes
to ~/miniend_logs/NAME.exit (what resume.sh checks).

Nothing multi-host needs setting: on Cloud TPU VMs miniend calls jax.distributed.initialize()
and JAX finds the other hosts (and, on multi-slice queued resources, the other slices) by
itself. (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are for other
clusters, where you start miniend on each host yourself.)

Required:
  --name NAME             TPU node name given to create.sh
  --workdir DIR           the run's work directory, passed as `miniend ... --workdir DIR`
                          (or give --workdir after '--'). Must be gs://... on multi-host
                          slices and multi-slice TPUs: every worker writes and restores the
                          same checkpoints.
  -- COMMAND FLAGS...     everything after '--' goes to miniend unchanged

Options:
  --tfds-data-dir DIR     exported as TFDS_DATA_DIR on every worker (e.g. gs://BUCKET/tfds)
  --env KEY=VALUE         another environment variable for the run (repeatable)
  --restart               first stop a miniend this script started earlier on the workers,
                          and any other process that holds the TPU chips (SIGTERM, SIGKILL
                          after 2 minutes), waiting until the chips are free; otherwise
                          launching over either is refused
  --relaunch              run the last command launched on NAME again (from the state
                          file; what resume.sh does after re-creating the TPU)
  --log-sync SECONDS      copy each worker's log to the gs:// workdir this often (default
                          60; 0: only when miniend exits). No copies for a local workdir.
  --accelerator-type T    only for the gs:// check; default: as given to create.sh
  --zone ZONE             default: as given to create.sh
  --project PROJECT       default: as given to create.sh
  --dry-run               Print the gcloud commands instead of running them
  -h, --help              Show this help

Before starting, each worker removes a stale /tmp/libtpu_lockfile (once nothing holds the
chips), and the run gets JAX_PLATFORMS=tpu (unless --env sets JAX_PLATFORMS), so it stops
with an error instead of training on the CPU when the TPU cannot be used.

Environment: MINIEND_TPU_SSH_FLAGS adds flags to every ssh (e.g. '--tunnel-through-iap',
which goes through gcloud's alpha track); remembered for NAME.

Example (the paper's MiniEnD-D run, T5-base teacher -> 6L-384H student):
  tpu_scripts/launch.sh --name miniend-v5p-32 \
    --workdir gs://BUCKET/miniend/t5base_6L384H_miniend_d --tfds-data-dir gs://BUCKET/tfds \
    -- distill --gin_file gin_configs/runs/paper_t5_base_6L384H.gin
EOF
}

NAME="" ZONE="" PROJECT="" MODE=vm WORKDIR="" TFDS_DIR="" ACCEL="" RESTART=0 RELAUNCH=0 LOG_SYNC=""
ENV_VARS=() MINIEND_ARGS=() HAVE_ARGS=0
UNKNOWN_FLAG_HINT=" (miniend's own flags go after '--')"
while (($#)); do
  case "$1" in
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE ;;
    --tfds-data-dir | --tfds-data-dir=*) flag_value "$@"; TFDS_DIR=$FLAG_VALUE ;;
    --env | --env=*) flag_value "$@"; ENV_VARS+=("$FLAG_VALUE") ;;
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCEL=$FLAG_VALUE ;;
    --log-sync | --log-sync=*) flag_value "$@"; LOG_SYNC=$FLAG_VALUE ;;
    --restart) RESTART=1 FLAG_SHIFT=1 ;;
    --relaunch) RELAUNCH=1 FLAG_SHIFT=1 ;;
    --) shift; MINIEND_ARGS=("$@"); HAVE_ARGS=1; break ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

resolve_existing_tpu
set_gcloud_flags

if ((RELAUNCH)); then
  if ((HAVE_ARGS)) || [[ -n "$WORKDIR$TFDS_DIR" ]] || ((${#ENV_VARS[@]})); then
    usage_error "--relaunch reuses the recorded command, workdir and environment; do not pass them again"
  fi
  [[ -n "${LAUNCH_ARGS+x}" ]] || die "nothing to relaunch: no command recorded for '$NAME' in $(state_file "$NAME")"
  WORKDIR=$LAUNCH_WORKDIR TFDS_DIR=$LAUNCH_TFDS_DATA_DIR
  ENV_VARS=("${LAUNCH_ENV[@]}") MINIEND_ARGS=("${LAUNCH_ARGS[@]}")
else
  if ((${#MINIEND_ARGS[@]} == 0)); then
    usage_error "missing the miniend command after '--' (e.g. -- distill --gin_file gin_configs/runs/paper_t5_base_6L384H.gin)"
  fi
  # --workdir may be given to this script (appended to miniend's flags) or after '--'.
  inner_workdir="" i=0
  for ((i = 0; i < ${#MINIEND_ARGS[@]}; i++)); do
    case "${MINIEND_ARGS[i]}" in
      --workdir) inner_workdir=${MINIEND_ARGS[i + 1]:-} ;;
      --workdir=*) inner_workdir=${MINIEND_ARGS[i]#*=} ;;
    esac
  done
  if [[ -n "$inner_workdir" && -n "$WORKDIR" && "$inner_workdir" != "$WORKDIR" ]]; then
    usage_error "two different work directories: --workdir $WORKDIR and, after '--', --workdir $inner_workdir"
  fi
  if [[ -z "$inner_workdir" && -n "$WORKDIR" ]]; then
    MINIEND_ARGS+=(--workdir "$WORKDIR")
  fi
  WORKDIR=${WORKDIR:-$inner_workdir}
  require_flag "$WORKDIR" --workdir gs://BUCKET/miniend/RUN
fi
for kv in "${ENV_VARS[@]}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env expects KEY=VALUE, got '$kv'"
done
LOG_SYNC=${LOG_SYNC:-${LAUNCH_LOG_SYNC:-60}}
[[ "$LOG_SYNC" =~ ^[0-9]+$ ]] || usage_error "--log-sync must be a whole number of seconds, got '$LOG_SYNC'"

# Every worker of a pod slice saves and restores its shards of the same checkpoint, and
# resuming after a preemption needs the checkpoints to outlive the VMs: gs:// only.
resolve_accelerator
hosts=$(num_hosts "$ACCEL" 2>/dev/null) || hosts=""
if ((NODE_COUNT > 1)); then
  hosts=$((${hosts:-1} * NODE_COUNT)) ACCEL="$NODE_COUNT x $ACCEL"
fi
if [[ "$WORKDIR" != gs://* ]]; then
  if [[ -n "$hosts" ]] && ((hosts > 1)); then
    usage_error "--workdir must be a gs:// path on $ACCEL ($hosts hosts): every worker must see the same checkpoints (e.g. --workdir gs://BUCKET/miniend/RUN)"
  fi
  info "warning: --workdir $WORKDIR is on the TPU VM's own disk: it is lost with the VM, so resume.sh cannot continue from it; prefer gs://"
fi
if [[ -n "$TFDS_DIR" && "$TFDS_DIR" != gs://* && -n "$hosts" ]] && ((hosts > 1)); then
  info "warning: --tfds-data-dir $TFDS_DIR is not gs://; every worker of $ACCEL needs its own copy of the data there"
fi

if ! ((DRY_RUN)); then
  # shellcheck disable=SC2034  # saved by name
  LAUNCH_WORKDIR=$WORKDIR LAUNCH_TFDS_DATA_DIR=$TFDS_DIR LAUNCH_ENV=("${ENV_VARS[@]}")
  # shellcheck disable=SC2034
  LAUNCH_ARGS=("${MINIEND_ARGS[@]}") LAUNCH_LOG_SYNC=$LOG_SYNC
  # A launch starts resume.sh's count of relaunches without progress afresh (resume.sh
  # writes its own count after it relaunches).
  # shellcheck disable=SC2034
  RESUME_LAST_STEP=-1 RESUME_STALLED=0 RESUME_METRICS_SIZE="" RESUME_METRICS_SINCE=""
  state_save "$NAME" LAUNCH_WORKDIR LAUNCH_TFDS_DATA_DIR LAUNCH_ENV LAUNCH_ARGS LAUNCH_LOG_SYNC \
    RESUME_LAST_STEP RESUME_STALLED RESUME_METRICS_SIZE RESUME_METRICS_SINCE
  remember_remote_access "$NAME"
fi

# ------------------------------------------------------------------ the remote script
# Multi-host: the same command starts on every worker (of every slice). On Cloud TPU VMs
# miniend calls jax.distributed.initialize() with no arguments and JAX finds the coordinator
# and the other hosts from the TPU metadata; on a multi-slice queued resource the TPU runtime
# also sets the MEGASCALE_* variables. So nothing multi-host is passed here.
log=$(remote_run_file log)
pid_file=$(remote_run_file pid)
exit_file=$(remote_run_file exit)

# The wrapper the workers run detached, as `bash -c WRAPPER miniend-run LOG EXIT_FILE GS_LOG
# EVERY MINIEND...`: runs miniend, copies the log to GS_LOG (when not empty) every EVERY
# seconds (0: only at the end), and once miniend has exited copies the log a last time,
# then writes miniend's exit status to EXIT_FILE (resume.sh reads it). A SIGTERM to the process
# group (launch.sh --restart) reaches miniend, which saves a checkpoint; the wrapper
# ignores it and waits.
# shellcheck disable=SC2016  # expanded by the worker's bash
wrapper_steps=('log=$1 exit_file=$2 gs_log=$3 every=$4' 'shift 4'
  'save_log() { [ -z "$gs_log" ] || gcloud storage cp "$log" "$gs_log" >/dev/null 2>&1 || true; }'
  '"$@" </dev/null >>"$log" 2>&1 & child=$!'
  'copier=""'
  # The copier's sleep goes with it when it is stopped (an orphaned sleep would linger).
  'if [ -n "$gs_log" ] && [ "$every" -gt 0 ]; then (trap '"'"'kill "$s" 2>/dev/null; exit 0'"'"' TERM; while :; do sleep "$every" & s=$!; wait "$s"; save_log; done) & copier=$!; fi'
  # Ignored from here on (miniend, already started, still gets them): wait for its status.
  "trap '' TERM INT"
  'wait "$child"; rc=$?'
  'if [ -n "$copier" ]; then kill "$copier" 2>/dev/null; fi'
  'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) miniend exited with status $rc" >>"$log"'
  'save_log'
  'echo "$rc" >"$exit_file"')
wrapper=$(printf '%s; ' "${wrapper_steps[@]}")
wrapper=${wrapper%; }

if ((RESTART)); then
  # setsid made the run its own process group: stop the whole group, wait for it to exit
  # (it releases the TPU only then), and kill it if it does not within two minutes.
  on_running="pid=\$(cat \"$pid_file\"); echo \"\$(hostname): stopping miniend (pid \$pid)\"; kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\" 2>/dev/null || true; for _ in \$(seq 600); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 0.2; done; kill -KILL -- \"-\$pid\" 2>/dev/null || true"
else
  on_running="echo \"\$(hostname): miniend is already running (pid \$(cat \"$pid_file\")); pass --restart to stop it first\" >&2; exit 1"
fi
# What holds the TPU chips (/dev/accel* up to v4, /dev/vfio/N from v5e on): a process of an
# earlier launch whose pid file was overwritten, another user's notebook, a run killed while
# libtpu held them. libtpu then refuses the TPU ("TPU is already in use"), and the lock file
# a killed run leaves behind does too, so: stop the holders (with --restart; otherwise
# refuse, naming them), wait until the chips are free (SIGKILL after 2 minutes), then
# remove the lock file, as MaxText's multihost runner does. MINIEND_TPU_CHIP_ROOT (unset on
# real workers) is where a played worker in the tests keeps its /dev and /tmp.
# shellcheck disable=SC2016  # all of it expanded by the worker's bash
chips_steps=('root=${MINIEND_TPU_CHIP_ROOT:-}'
  'chips() { ls -d "$root"/dev/accel* "$root"/dev/vfio/[0-9]* 2>/dev/null || true; }'
  'holders() { if [ -n "$(chips)" ] && command -v lsof >/dev/null 2>&1; then { sudo -n lsof -t -w $(chips) 2>/dev/null || lsof -t -w $(chips) 2>/dev/null; } | sort -u | tr "\n" " "; fi; true; }'
  'describe_pids() { ps -o pid=,user=,args= -p "$(echo $1 | tr " " ",")" 2>/dev/null | sed "s/^ *//" | tr -s " " | tr "\n" ";"; }'
  'signal_pids() { sudo -n kill "$1" $2 2>/dev/null || kill "$1" $2 2>/dev/null || true; }'
  'wait_released() { for _ in $(seq "$1"); do held=$(holders); [ -z "$held" ] && break; sleep 0.5; done; }'
  'held=$(holders)')
# shellcheck disable=SC2016
if ((RESTART)); then
  chips_steps+=('if [ -n "$held" ]; then echo "$(hostname): stopping what holds the TPU: $(describe_pids "$held")"; signal_pids -TERM "$held"; wait_released 240; fi'
    'if [ -n "$held" ]; then signal_pids -KILL "$held"; wait_released 60; fi'
    'if [ -n "$held" ]; then echo "$(hostname): $(describe_pids "$held") still hold the TPU after SIGKILL: reboot this worker or re-create the TPU (tpu_scripts/resume.sh --recreate)" >&2; exit 1; fi')
else
  chips_steps+=('if [ -n "$held" ]; then echo "$(hostname): the TPU is held by another process: $(describe_pids "$held") stop it, or pass --restart to stop it first" >&2; exit 1; fi')
fi
# shellcheck disable=SC2016
chips_steps+=('sudo -n rm -f "$root/tmp/libtpu_lockfile" 2>/dev/null || rm -f "$root/tmp/libtpu_lockfile"')

common_steps=("set -euo pipefail"
  "mkdir -p \"$REMOTE_LOGS\""
  "cd \"$REMOTE_SRC\""
  "test -x \"$REMOTE_VENV/bin/miniend\" || { echo \"\$(hostname): miniend is not installed; run tpu_scripts/setup.sh --name $NAME first\" >&2; exit 1; }"
  "if [ -f \"$pid_file\" ] && kill -0 \"\$(cat \"$pid_file\")\" 2>/dev/null; then $on_running; fi"
  "${chips_steps[@]}"
  "rm -f \"$exit_file\"")
# On a TPU VM a run never falls back to the CPU quietly: JAX fails instead (and miniend
# says what to do). --env JAX_PLATFORMS=... overrides it.
if [[ " ${ENV_VARS[*]%%=*} " != *" JAX_PLATFORMS "* ]]; then
  common_steps+=("export JAX_PLATFORMS=tpu")
fi
if [[ -n "$TFDS_DIR" ]]; then
  common_steps+=("export TFDS_DATA_DIR=$(shell_quote "$TFDS_DIR")")
fi
for kv in "${ENV_VARS[@]}"; do
  common_steps+=("export ${kv%%=*}=$(shell_quote "${kv#*=}")")
done
miniend_cmd="\"$REMOTE_VENV/bin/miniend\" $(shell_quote "${MINIEND_ARGS[@]}")"

# launch_on_node NODE: start the run on every worker of NODE. With a gs:// workdir each
# worker's log goes to WORKDIR/logs/workers/NODE-wN.log too (and a new VM continues the
# log from there), so it outlives the VM.
launch_on_node() {
  local node=$1 steps=("${common_steps[@]}") gs_log="''" synced=""
  if [[ "$WORKDIR" == gs://* ]]; then
    steps+=("h=\$(hostname); case \"\$h\" in *-w-[0-9]*) w=w\${h##*-w-} ;; *) w=\$h ;; esac"
      "gs_log=$(shell_quote "$(bucket_logs_dir "$WORKDIR")/$node-")\$w.log"
      "if [ ! -f \"$log\" ]; then gcloud storage cp \"\$gs_log\" \"$log\" >/dev/null 2>&1 || true; fi")
    gs_log="\"\$gs_log\"" synced=", copied to \$gs_log"
  fi
  steps+=("echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) miniend $(shell_quote "${MINIEND_ARGS[@]}" | sed 's/["$`\\]/\\&/g')\" >>\"$log\""
    # setsid + nohup: own session, SIGHUP ignored, no terminal: survives the ssh exit.
    "setsid nohup bash -c $(shell_quote "$wrapper") miniend-run \"$log\" \"$exit_file\" $gs_log $LOG_SYNC $miniend_cmd >>\"$log\" 2>&1 </dev/null & echo \$! >\"$pid_file\""
    "echo \"\$(hostname): started miniend (pid \$(cat \"$pid_file\")), log: $log$synced\"")
  local remote_cmd
  remote_cmd=$(printf '%s; ' "${steps[@]}")
  node_ssh "$node" all "${remote_cmd%; }"
}

each_node launch_on_node
if ! ((DRY_RUN)); then
  info "launched on every worker of $NAME. Follow with: tpu_scripts/logs.sh --name $NAME"
fi
