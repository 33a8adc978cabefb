#!/usr/bin/env bash
# Bring a preempted spot / queued TPU run back: re-create, set up, re-launch.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: resume.sh --name NAME [options]

Check the TPU's state and, when it was preempted or is gone (PREEMPTED, TERMINATED,
STOPPED, SUSPENDED, FAILED, not found):
  1. delete what is left of it (tpu-vm delete / queued-resources delete --force),
  2. create it again with the flags create.sh recorded in ~/.miniend_tpu/NAME.env,
  3. run setup.sh again with the recorded source (--repo/--ref or --scp-local),
  4. launch the recorded miniend command again (launch.sh --relaunch).
The run continues from the latest checkpoint in its gs:// work directory: the trainer
restores it by itself. A READY/ACTIVE TPU is left alone; one still being created or
queued is waited for, then set up and launched.

Options:
  --name NAME               TPU node name given to create.sh (required)
  --timeout SECONDS         how long to wait for READY/ACTIVE (default 3600; 0 = forever)
  --poll-interval SECONDS   seconds between state checks (default 30)
  --watch SECONDS           keep checking every SECONDS (e.g. 600) until Ctrl-C or until
                            teardown.sh removes the state file: unattended spot training
  --dry-run                 Print the gcloud commands, assuming the TPU was preempted
  -h, --help                Show this help

Examples:
  tpu_scripts/resume.sh --name miniend-v4-8
  tpu_scripts/resume.sh --name miniend-v5p-32 --watch 600
USAGE
}

NAME="" ZONE="" PROJECT="" MODE=vm TIMEOUT=3600 POLL_INTERVAL=30 WATCH=""
while (($#)); do
  case "$1" in
    --timeout | --timeout=*) flag_value "$@"; TIMEOUT=$FLAG_VALUE ;;
    --poll-interval | --poll-interval=*) flag_value "$@"; POLL_INTERVAL=$FLAG_VALUE ;;
    --watch | --watch=*) flag_value "$@"; WATCH=$FLAG_VALUE ;;
    --zone | --zone=* | --project | --project=*)
      usage_error "unknown argument '$1' (resume.sh uses the zone and project create.sh recorded)" ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_flag "$NAME" --name miniend-v4-8
validate_name "$NAME"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout must be a whole number of seconds, got '$TIMEOUT'"
[[ "$POLL_INTERVAL" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "--poll-interval must be a number of seconds, got '$POLL_INTERVAL'"
here=$(dirname "${BASH_SOURCE[0]}")

if [[ -n "$WATCH" ]]; then
  [[ "$WATCH" =~ ^[0-9]+$ && "$WATCH" -gt 0 ]] || usage_error "--watch must be a positive number of seconds, got '$WATCH'"
  ((!DRY_RUN)) || usage_error "--watch and --dry-run do not mix"
  # One check per round in a child process, so a failed attempt (no capacity yet, say)
  # is retried at the next round instead of ending the watch.
  while [[ -f "$(state_file "$NAME")" ]]; do
    "$here/resume.sh" --name "$NAME" --timeout "$TIMEOUT" --poll-interval "$POLL_INTERVAL" ||
      info "this attempt failed; trying again in ${WATCH}s"
    sleep "$WATCH"
  done
  info "no state file for $NAME any more (torn down?): stopping the watch"
  exit 0
fi

state_load "$NAME" ||
  die "no state for '$NAME' in $(state_file "$NAME"): resume needs the flags recorded by tpu_scripts/create.sh --name $NAME ..."
ZONE=$CREATE_ZONE PROJECT=$CREATE_PROJECT
if [[ "$CREATE_QUEUED" == 1 ]]; then MODE=queued; else MODE=vm; fi
set_gcloud_flags
dry=()
if ((DRY_RUN)); then dry=(--dry-run); fi

if ((DRY_RUN)); then
  echo "# check: $(describe_command)  (dry-run assumes PREEMPTED)"
  state=PREEMPTED
else
  state=$(describe_state)
fi
info "$NAME is $state"

case "$state" in
  READY | ACTIVE)
    info "nothing to resume. To restart the run on it anyway: tpu_scripts/launch.sh --name $NAME --relaunch --restart"
    exit 0
    ;;
  CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING_RESOURCES)
    # A create (or repair) is under way: wait for it, then set up and launch below.
    wait_until_ready "$TIMEOUT" "$POLL_INTERVAL"
    ;;
  NOT_FOUND | PREEMPTED | TERMINATED | STOPPED | SUSPENDED | SUSPENDING | FAILED)
    if [[ "$state" != NOT_FOUND ]]; then
      # A preempted node (or suspended queued resource) keeps its name taken until deleted.
      "$here/teardown.sh" --name "$NAME" --keep-state "${dry[@]}"
    fi
    create_flags=(--name "$NAME" --zone "$ZONE" --accelerator-type "$CREATE_ACCELERATOR_TYPE"
      --runtime-version "$CREATE_RUNTIME_VERSION" --timeout "$TIMEOUT" --poll-interval "$POLL_INTERVAL")
    if [[ -n "$PROJECT" ]]; then create_flags+=(--project "$PROJECT"); fi
    if [[ "$CREATE_SPOT" == 1 ]]; then create_flags+=(--spot); fi
    if [[ "$CREATE_QUEUED" == 1 ]]; then create_flags+=(--queued); fi
    "$here/create.sh" "${create_flags[@]}" "${dry[@]}" -- "${CREATE_EXTRA_ARGS[@]}"
    ;;
  *)
    die "$NAME is in state '$state', which resume.sh does not handle; check it with: $(describe_command)"
    ;;
esac

# A fresh TPU has empty disks: install the code again, then start the same command.
if [[ -z "${SETUP_SCP_LOCAL+x}" ]]; then
  info "no setup recorded for $NAME: run tpu_scripts/setup.sh and launch.sh yourself"
  exit 0
fi
"$here/setup.sh" --name "$NAME" "${dry[@]}"
if [[ -z "${LAUNCH_ARGS+x}" ]]; then
  info "no launch recorded for $NAME: run tpu_scripts/launch.sh yourself"
  exit 0
fi
"$here/launch.sh" --name "$NAME" --relaunch "${dry[@]}"
info "resumed $NAME; the run continues from the latest checkpoint in $LAUNCH_WORKDIR"
