#!/usr/bin/env bash
# Follow the log of a run started by launch.sh (on the workers, or its copy in the bucket).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: logs.sh --name NAME [--worker N|all] [--node I|all] [--lines N] [--no-follow] [--bucket]

Show ~/miniend_logs/NAME.log of one worker (default: worker 0, JAX process 0, the
one that reports metrics) or of all workers, each line prefixed
with the worker's host name. Follows the log (tail -F) until Ctrl-C; the run itself
keeps going.

Options:
  --name NAME         TPU name given to create.sh (required)
  --worker N|all      which worker (default 0)
  --node I|all        multi-slice TPUs (create.sh --node-count): which slice, NAME-I
                      (default 0)
  --lines N           how many past lines to show first (default 100)
  --no-follow         print and exit instead of following
  --bucket            read the copy launch.sh keeps in the gs:// work directory,
                      WORKDIR/logs/workers/NODE-wN.log, instead of the worker: works when
                      the VM is gone (preempted, deleted). Prints and exits.
  --workdir DIR       with --bucket: the run's gs:// work directory (default: the last one
                      launch.sh used on NAME)
  --zone ZONE         default: as given to create.sh
  --project PROJECT   default: as given to create.sh
  --dry-run           Print the gcloud command instead of running it
  -h, --help          Show this help

Examples:
  tpu_scripts/logs.sh --name miniend-v4-8
  tpu_scripts/logs.sh --name miniend-v5p-32 --worker all --lines 20 --no-follow
  tpu_scripts/logs.sh --name miniend-v5p-32 --worker 3 --bucket
USAGE
}

NAME="" ZONE="" PROJECT="" MODE=vm WORKER=0 NODE=0 LINES=100 FOLLOW=1 BUCKET=0 WORKDIR=""
while (($#)); do
  case "$1" in
    --worker | --worker=*) flag_value "$@"; WORKER=$FLAG_VALUE ;;
    --node | --node=*) flag_value "$@"; NODE=$FLAG_VALUE ;;
    --lines | --lines=*) flag_value "$@"; LINES=$FLAG_VALUE ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE ;;
    --no-follow) FOLLOW=0 FLAG_SHIFT=1 ;;
    --bucket) BUCKET=1 FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

if ((BUCKET)); then
  # No TPU needed, so no zone either.
  require_flag "$NAME" --name miniend-v4-8
  validate_name "$NAME"
  load_defaults_from_state
else
  resolve_existing_tpu
fi
set_gcloud_flags
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or 'all', got '$WORKER'"
[[ "$NODE" == all || "$NODE" =~ ^[0-9]+$ ]] || usage_error "--node must be a number or 'all', got '$NODE'"
[[ "$LINES" =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got '$LINES'"
if [[ "$NODE" != all ]] && ((NODE > 0 && NODE >= NODE_COUNT)); then
  usage_error "--node $NODE: $NAME has $NODE_COUNT slice(s), numbered from 0"
fi

# bucket_tail NODE: print the last lines of NODE's worker log(s) from the bucket.
bucket_tail() {
  local node=$1 url urls=()
  if [[ "$WORKER" == all ]]; then
    if ((DRY_RUN)); then
      run "$GCLOUD" storage ls "$logs_dir/$node-*.log"
      return
    fi
    mapfile -t urls < <("$GCLOUD" storage ls "$logs_dir/$node-*.log" 2>/dev/null) ||
      die "no worker logs of $node under $logs_dir"
  else
    urls=("$logs_dir/$node-w$WORKER.log")
  fi
  for url in "${urls[@]}"; do
    if ((DRY_RUN)); then
      run "$GCLOUD" storage cat "$url"
    elif [[ "$WORKER" == all ]]; then
      "$GCLOUD" storage cat "$url" | tail -n "$LINES" | sed "s|^|[${url##*/}] |"
    else
      "$GCLOUD" storage cat "$url" | tail -n "$LINES" ||
        die "could not read $url (was the run launched with a gs:// --workdir? see --worker all)"
    fi
  done
}

if ((BUCKET)); then
  WORKDIR=${WORKDIR:-${LAUNCH_WORKDIR:-}}
  require_flag "$WORKDIR" --workdir gs://BUCKET/miniend/RUN
  [[ "$WORKDIR" == gs://* ]] ||
    usage_error "--bucket reads the copies in a gs:// work directory; $WORKDIR is on the workers' disks"
  logs_dir=$(bucket_logs_dir "$WORKDIR")
  if [[ "$NODE" == all ]]; then
    for node in $(node_names); do bucket_tail "$node"; done
  else
    bucket_tail "$(node_name "$NODE")"
  fi
  exit 0
fi

log=$(remote_run_file log)
if ((FOLLOW)); then tail_cmd="tail -n $LINES -F \"$log\""; else tail_cmd="tail -n $LINES \"$log\""; fi
if [[ "$WORKER" == all || "$NODE" == all ]]; then
  # gcloud interleaves the workers' output unlabelled: label each line with its host.
  tail_cmd="$tail_cmd | sed -u \"s/^/[\$(hostname)] /\""
fi
if [[ "$NODE" == all ]]; then
  tpu_ssh "$WORKER" "$tail_cmd"
else
  node_ssh "$(node_name "$NODE")" "$WORKER" "$tail_cmd"
fi
