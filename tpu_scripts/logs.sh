#!/usr/bin/env bash
# Follow the log of a run started by launch.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: logs.sh --name NAME [--worker N|all] [--lines N] [--no-follow]

Show ~/miniend_logs/NAME.log of one worker (default: worker 0, JAX process 0, the
one that reports metrics) or of all workers, each line prefixed
with the worker's host name. Follows the log (tail -F) until Ctrl-C; the run itself
keeps going.

Options:
  --name NAME         TPU node name given to create.sh (required)
  --worker N|all      which worker (default 0)
  --lines N           how many past lines to show first (default 100)
  --no-follow         print and exit instead of following
  --zone ZONE         default: as given to create.sh
  --project PROJECT   default: as given to create.sh
  --dry-run           Print the gcloud command instead of running it
  -h, --help          Show this help

Examples:
  tpu_scripts/logs.sh --name miniend-v4-8
  tpu_scripts/logs.sh --name miniend-v5p-32 --worker all --lines 20 --no-follow
EOF
}

NAME="" ZONE="" PROJECT="" MODE=vm WORKER=0 LINES=100 FOLLOW=1
while (($#)); do
  case "$1" in
    --worker | --worker=*) flag_value "$@"; WORKER=$FLAG_VALUE ;;
    --lines | --lines=*) flag_value "$@"; LINES=$FLAG_VALUE ;;
    --no-follow) FOLLOW=0 FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

resolve_existing_tpu
set_gcloud_flags
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or 'all', got '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got '$LINES'"

log="$REMOTE_LOGS/$NAME.log"
if ((FOLLOW)); then tail_cmd="tail -n $LINES -F \"$log\""; else tail_cmd="tail -n $LINES \"$log\""; fi
if [[ "$WORKER" == all ]]; then
  # gcloud interleaves the workers' output unlabelled: label each line with its host.
  tail_cmd="$tail_cmd | sed -u \"s/^/[\$(hostname)] /\""
fi
tpu_ssh "$WORKER" "$tail_cmd"
