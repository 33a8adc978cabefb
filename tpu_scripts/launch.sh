#!/usr/bin/env bash
# Start `miniend <command> ...` on every worker of a TPU VM / pod slice, detached.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch.sh --name NAME --workdir DIR [options] -- MINIEND_COMMAND [MINIEND_FLAGS...]

Run `miniend MINIEND_COMMAND ...` on every worker at once (--worker=all), under
setsid + nohup so it keeps running after ssh disconnects. Each worker logs to its own
~/miniend_logs/NAME.log (follow with tpu_scripts/logs.sh --name NAME).

Required:
  --name NAME             TPU node name given to create.sh
  --workdir DIR           the run's work directory, passed as `miniend ... --workdir DIR`
                          (or give --workdir after '--'). Must be gs://... on multi-host
                          slices: every worker writes and restores the same checkpoints.
  -- COMMAND FLAGS...     everything after '--' goes to miniend unchanged

Options:
  --tfds-data-dir DIR     exported as TFDS_DATA_DIR on every worker (e.g. gs://BUCKET/tfds)
  --env KEY=VALUE         another environment variable for the run (repeatable)
  --restart               stop a miniend this script started earlier on the workers first
                          (otherwise launching over a running one is refused)
  --relaunch              run the last command launched on NAME again (from the state
                          file; what resume.sh does after re-creating the TPU)
  --accelerator-type T    only for the gs:// check; default: as given to create.sh
  --zone ZONE             default: as given to create.sh
  --project PROJECT       default: as given to create.sh
  --dry-run               Print the gcloud commands instead of running them
  -h, --help              Show this help

Environment: MINIEND_TPU_SSH_FLAGS adds flags to every ssh (e.g. '--tunnel-through-iap').

Example (the paper's MiniEnD-D run, T5-base teacher -> 6L-384H student):
  tpu_scripts/launch.sh --name miniend-v5p-32 \
    --workdir gs://BUCKET/miniend/t5base_6L384H_miniend_d --tfds-data-dir gs://BUCKET/tfds \
    -- distill --gin_file gin_configs/runs/paper_t5_base_6L384H.gin
EOF
}

NAME="" ZONE="" PROJECT="" MODE=vm WORKDIR="" TFDS_DIR="" ACCEL="" RESTART=0 RELAUNCH=0
ENV_VARS=() MINIEND_ARGS=() HAVE_ARGS=0
UNKNOWN_FLAG_HINT=" (miniend's own flags go after '--')"
while (($#)); do
  case "$1" in
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE ;;
    --tfds-data-dir | --tfds-data-dir=*) flag_value "$@"; TFDS_DIR=$FLAG_VALUE ;;
    --env | --env=*) flag_value "$@"; ENV_VARS+=("$FLAG_VALUE") ;;
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCEL=$FLAG_VALUE ;;
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

# Every worker of a pod slice saves and restores its shards of the same checkpoint, and
# resuming after a preemption needs the checkpoints to outlive the VMs: gs:// only.
ACCEL=${ACCEL:-${CREATE_ACCELERATOR_TYPE:-}}
if [[ -z "$ACCEL" ]] && ! ((DRY_RUN)); then
  ACCEL=$("$GCLOUD" compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${GCLOUD_FLAGS[@]}" \
    --format='value(acceleratorType)' 2>/dev/null) || ACCEL=""
fi
hosts=$(num_hosts "$ACCEL" 2>/dev/null) || hosts=""
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
  LAUNCH_ARGS=("${MINIEND_ARGS[@]}")
  state_save "$NAME" LAUNCH_WORKDIR LAUNCH_TFDS_DATA_DIR LAUNCH_ENV LAUNCH_ARGS
fi

# ------------------------------------------------------------------ the remote script
# Multi-host: the same command starts on every worker. On TPU pods JAX discovers the
# coordinator and the other processes itself (miniend calls jax.distributed.initialize()
# with no arguments), so nothing extra is needed here.
log="$REMOTE_LOGS/$NAME.log"
pid_file="$REMOTE_LOGS/$NAME.pid"
if ((RESTART)); then
  # setsid made the run its own process group: stop the whole group, wait for it to exit
  # (it releases the TPU only then), and kill it if it does not within two minutes.
  on_running="pid=\$(cat \"$pid_file\"); echo \"\$(hostname): stopping miniend (pid \$pid)\"; kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\" 2>/dev/null || true; for _ in \$(seq 120); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; kill -KILL -- \"-\$pid\" 2>/dev/null || true"
else
  on_running="echo \"\$(hostname): miniend is already running (pid \$(cat \"$pid_file\")); pass --restart to stop it first\" >&2; exit 1"
fi
steps=("set -euo pipefail"
  "mkdir -p \"$REMOTE_LOGS\""
  "cd \"$REMOTE_SRC\""
  "test -x \"$REMOTE_VENV/bin/miniend\" || { echo \"\$(hostname): miniend is not installed; run tpu_scripts/setup.sh --name $NAME first\" >&2; exit 1; }"
  "if [ -f \"$pid_file\" ] && kill -0 \"\$(cat \"$pid_file\")\" 2>/dev/null; then $on_running; fi")
if [[ -n "$TFDS_DIR" ]]; then
  steps+=("export TFDS_DATA_DIR=$(shell_quote "$TFDS_DIR")")
fi
for kv in "${ENV_VARS[@]}"; do
  steps+=("export ${kv%%=*}=$(shell_quote "${kv#*=}")")
done
miniend_cmd="\"$REMOTE_VENV/bin/miniend\" $(shell_quote "${MINIEND_ARGS[@]}")"
steps+=("echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) miniend $(shell_quote "${MINIEND_ARGS[@]}" | sed 's/["$`\\]/\\&/g')\" >>\"$log\""
  # setsid + nohup: own session, SIGHUP ignored, no terminal: survives the ssh exit.
  "setsid nohup $miniend_cmd >>\"$log\" 2>&1 </dev/null & echo \$! >\"$pid_file\""
  "echo \"\$(hostname): started miniend (pid \$(cat \"$pid_file\")), log: $log\"")
remote_cmd=$(printf '%s; ' "${steps[@]}")
remote_cmd=${remote_cmd%; }

tpu_ssh all "$remote_cmd"
if ! ((DRY_RUN)); then
  info "launched on every worker of $NAME. Follow with: tpu_scripts/logs.sh --name $NAME"
fi
