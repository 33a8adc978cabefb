#!/usr/bin/env bash
# Keep a TPU run going: bring back a preempted TPU, relaunch a crashed or hung run, stop when done.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: resume.sh --name NAME [options]

Check the TPU and the run launch.sh started on it, and bring the run back when needed.
What the TPU API says (describe) decides:

- ready (READY, ACTIVE): ask every worker whether miniend still runs.
  - It is gone on some worker (crashed, killed, or stopped after a SIGTERM): stop it
    where it still runs and launch it again on all workers, so that all hosts start
    together (launch.sh --relaunch --restart). A host whose peer died cannot save a
    checkpoint: the run continues from the last one saved before the failure.
    A run that hangs while training ends itself: its watchdog (WatchdogConfig) exits
    with status 4 when no step finishes for 20 times the recent step time (at least
    20 minutes), and it is relaunched as any exited run.
  - It runs everywhere but WORKDIR/logs/train_metrics.jsonl has not changed for
    --hung-after seconds: it is hung where the watchdog does not look (loading,
    compiling, or with the watchdog off); it is stopped (SIGTERM, SIGKILL after 2
    minutes) and launched again, the same way.
  - It runs everywhere and moves: nothing to do.
- pending, on its way to ready by itself (CREATING, STARTING, RESTARTING, REPAIRING,
  REIMAGING, UNHIDING; queued: CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING):
  wait for it, then set up and launch.
- gone (PREEMPTED, TERMINATED, STOPPED, STOPPING, HIDING, HIDDEN, DELETING, not found;
  queued: SUSPENDING, SUSPENDED, DELETING) or failed (UNKNOWN, a node after a failed repair;
  queued: FAILED; STATE_UNSPECIFIED): wait until a stop, suspension or deletion under way
  has finished, delete what is left (tpu-vm delete / queued-resources delete --force),
  create it again with the flags create.sh recorded in ~/.miniend_tpu/NAME.env (multi-slice
  ones with the same --node-count), run setup.sh again with the recorded source, and launch
  the recorded miniend command again (launch.sh --relaunch).
- any other state: an error; nothing is guessed.

The run continues from the latest checkpoint in its work directory: the trainer restores
it by itself. Nothing is relaunched once the run has finished (WORKDIR/summary.json says
"preempted": false), nor after --max-stalled relaunches in a row that made no progress
(the latest step saved in WORKDIR/checkpoints/ or summary.json did not grow): a run that
fails the same way every time is not restarted forever. launch.sh starts that count anew.

Options:
  --name NAME               TPU name given to create.sh (required)
  --timeout SECONDS         how long to wait for READY/ACTIVE (default 3600; 0 = forever)
  --poll-interval SECONDS   seconds between state checks (default 30)
  --watch SECONDS           check again every SECONDS (e.g. 600) until the run finishes,
                            relaunching stops for want of progress, teardown.sh removes the
                            state file, or Ctrl-C: unattended spot training
  --max-stalled N           stop relaunching after N relaunches in a row without progress
                            (default 3; 0: no limit)
  --hung-after SECONDS      a training run (distill, pretrain, finetune) whose metrics file
                            has not changed for this long is hung
                            (default 3600: more than the longest load, compile, evaluation
                            or checkpoint between two logged steps; 0: never)
  --recreate-after K        with --watch: after K rounds in a row that failed (a worker
                            unreachable by ssh, a relaunch that failed, a state not known
                            here), delete and create the TPU again (default 3; 0: never)
  --recreate                delete and create the TPU again now (unless it is pending: that
                            is waited for), then set up and launch
  --dry-run                 Print the gcloud commands, assuming the TPU was preempted
                            (queued resources: suspended)
  -h, --help                Show this help

Exit status: 0 done (relaunched, healthy, or finished), 1 this attempt failed (the watch
tries again), 2 usage error, 3 not relaunched: no progress.

Examples:
  tpu_scripts/resume.sh --name miniend-v4-8
  tpu_scripts/resume.sh --name miniend-v5p-32 --watch 600
USAGE
}

NAME="" ZONE="" PROJECT="" MODE=vm TIMEOUT=3600 POLL_INTERVAL=30 WATCH="" MAX_STALLED=3
HUNG_AFTER=3600 RECREATE_AFTER=3 RECREATE=0
EXIT_GAVE_UP=3
# Under --watch each round runs in a child, which says "the run finished" with this status.
EXIT_FINISHED_IN_WATCH=10
while (($#)); do
  case "$1" in
    --timeout | --timeout=*) flag_value "$@"; TIMEOUT=$FLAG_VALUE ;;
    --poll-interval | --poll-interval=*) flag_value "$@"; POLL_INTERVAL=$FLAG_VALUE ;;
    --watch | --watch=*) flag_value "$@"; WATCH=$FLAG_VALUE ;;
    --max-stalled | --max-stalled=*) flag_value "$@"; MAX_STALLED=$FLAG_VALUE ;;
    --hung-after | --hung-after=*) flag_value "$@"; HUNG_AFTER=$FLAG_VALUE ;;
    --recreate-after | --recreate-after=*) flag_value "$@"; RECREATE_AFTER=$FLAG_VALUE ;;
    --recreate) RECREATE=1 FLAG_SHIFT=1 ;;
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
[[ "$MAX_STALLED" =~ ^[0-9]+$ ]] || usage_error "--max-stalled must be a whole number, got '$MAX_STALLED'"
[[ "$HUNG_AFTER" =~ ^[0-9]+$ ]] || usage_error "--hung-after must be a whole number of seconds, got '$HUNG_AFTER'"
[[ "$RECREATE_AFTER" =~ ^[0-9]+$ ]] || usage_error "--recreate-after must be a whole number, got '$RECREATE_AFTER'"
here=$(dirname "${BASH_SOURCE[0]}")

# watch: one check per round in a child process, so a failed attempt (no capacity yet, a
# worker that does not answer) is retried at the next round instead of ending the watch;
# after RECREATE_AFTER failed rounds in a row the next round re-creates the TPU.
watch() {
  local failed=0 rc round
  while [[ -f "$(state_file "$NAME")" ]]; do
    round=(--name "$NAME" --timeout "$TIMEOUT" --poll-interval "$POLL_INTERVAL"
      --max-stalled "$MAX_STALLED" --hung-after "$HUNG_AFTER")
    if ((RECREATE_AFTER > 0 && failed >= RECREATE_AFTER)); then
      info "$failed rounds in a row failed: re-creating $NAME"
      round+=(--recreate)
    fi
    rc=0
    MINIEND_TPU_RESUME_WATCHED=1 "$here/resume.sh" "${round[@]}" || rc=$?
    case "$rc" in
      0) failed=0 ;;
      "$EXIT_FINISHED_IN_WATCH") info "stopping the watch: the run finished"; exit 0 ;;
      "$EXIT_GAVE_UP") info "stopping the watch: relaunching made no progress (see above)"; exit "$EXIT_GAVE_UP" ;;
      *)
        failed=$((failed + 1))
        info "this round failed ($failed in a row; the TPU is re-created after ${RECREATE_AFTER:-0}, 0 = never); trying again in ${WATCH}s" ;;
    esac
    sleep "$WATCH"
  done
  info "no state file for $NAME any more (torn down?): stopping the watch"
  exit 0
}

if [[ -n "$WATCH" ]]; then
  [[ "$WATCH" =~ ^[0-9]*\.?[0-9]+$ && ! "$WATCH" =~ ^[0.]+$ ]] ||
    usage_error "--watch must be a positive number of seconds, got '$WATCH'"
  ((!DRY_RUN)) || usage_error "--watch and --dry-run do not mix"
  ((!RECREATE)) || usage_error "--watch and --recreate do not mix (see --recreate-after)"
  watch
fi

state_load "$NAME" ||
  die "no state for '$NAME' in $(state_file "$NAME"): resume needs the flags recorded by tpu_scripts/create.sh --name $NAME ..."
ZONE=$CREATE_ZONE PROJECT=$CREATE_PROJECT NODE_COUNT=${CREATE_NODE_COUNT:-1}
if [[ "$CREATE_QUEUED" == 1 ]]; then MODE=queued; else MODE=vm; fi
set_gcloud_flags
resolve_remote_access
dry=()
if ((DRY_RUN)); then dry=(--dry-run); fi
launched=0
if [[ -n "${LAUNCH_ARGS+x}" ]]; then launched=1; fi

# ------------------------------------------------------------------ the run's progress

# read_run_status: RUN_STEP, the latest step saved in the work directory (the highest
# WORKDIR/checkpoints/STEP, or summary.json's step; -1 for none), and RUN_FINISHED=1 when
# summary.json says the run ended without being preempted, at or after that step.
# A gs:// work directory is read from here; a local one on worker 0 (while it exists).
read_run_status() {
  local wd=$LAUNCH_WORKDIR summary="" listing="" out line step
  local re_done='"preempted"[[:space:]]*:[[:space:]]*false' re_step='"step"[[:space:]]*:[[:space:]]*([0-9]+)'
  RUN_STEP=-1 RUN_FINISHED=0
  if [[ "$wd" == gs://* ]]; then
    summary=$("$GCLOUD" storage cat "${wd%/}/summary.json" 2>/dev/null) || summary=""
    listing=$("$GCLOUD" storage ls "${wd%/}/checkpoints/" 2>/dev/null) || listing=""
  else
    # A relative workdir is relative to ~/miniend_jax, where launch.sh starts miniend.
    out=$(node_ssh "$(node_name 0)" 0 "cd \"$REMOTE_SRC\" 2>/dev/null; cat $(shell_quote "$wd/summary.json") 2>/dev/null; echo; echo @@checkpoints@@; ls -1 $(shell_quote "$wd/checkpoints") 2>/dev/null; true" 2>/dev/null) || out=""
    summary=${out%%@@checkpoints@@*}
    if [[ "$out" == *@@checkpoints@@* ]]; then listing=${out#*@@checkpoints@@}; fi
  fi
  while IFS= read -r line; do
    line=${line%/}
    step=${line##*/}
    if [[ "$step" =~ ^[0-9]+$ ]] && ((step > RUN_STEP)); then RUN_STEP=$step; fi
  done <<<"$listing"
  if [[ "$summary" =~ $re_step ]]; then
    step=${BASH_REMATCH[1]}
    if [[ "$summary" =~ $re_done ]] && ((step >= RUN_STEP)); then RUN_FINISHED=1; fi
    if ((step > RUN_STEP)); then RUN_STEP=$step; fi
  fi
}

# stop_if_finished: end here when the run has finished.
stop_if_finished() {
  if ((RUN_FINISHED)); then
    info "the run in $LAUNCH_WORKDIR finished at step $RUN_STEP (summary.json): nothing to resume. Delete the TPU with: tpu_scripts/teardown.sh --name $NAME"
    if [[ -n "${MINIEND_TPU_RESUME_WATCHED:-}" ]]; then exit "$EXIT_FINISHED_IN_WATCH"; fi
    exit 0
  fi
}

# claim_relaunch: count the relaunch about to happen; refuse it (exit 3) once MAX_STALLED
# relaunches in a row have not moved the latest saved step past the one seen before them.
claim_relaunch() {
  local last=${RESUME_LAST_STEP:--1} stalled=${RESUME_STALLED:-0}
  if ((RUN_STEP > last)); then stalled=0; fi
  if ((MAX_STALLED > 0 && stalled >= MAX_STALLED)); then
    info "not relaunching $NAME: the last $stalled relaunches made no progress (latest saved step: $RUN_STEP; -1 = none). The run fails the same way each time: read the logs (tpu_scripts/logs.sh --name $NAME --worker all --no-follow, or add --bucket), fix the cause, then start it again with tpu_scripts/launch.sh --name $NAME --relaunch --restart (a launch resets this count), or allow more with --max-stalled."
    exit "$EXIT_GAVE_UP"
  fi
  NEXT_STALLED=$((stalled + 1))
}

# record_relaunch: remember the step this relaunch started from (launch.sh reset the count).
record_relaunch() {
  if ((DRY_RUN)); then return; fi
  # shellcheck disable=SC2034  # saved by name
  RESUME_LAST_STEP=$RUN_STEP RESUME_STALLED=$NEXT_STALLED
  state_update RESUME_LAST_STEP RESUME_STALLED
}

# state_update VAR...: state_save, unless teardown.sh removed the state file meanwhile
# (a new one would keep a --watch going on a TPU that is gone).
state_update() {
  if [[ -f "$(state_file "$NAME")" ]]; then state_save "$NAME" "$@"; fi
}

# metrics_url: the metrics file the trainer rewrites at every logged step.
metrics_url() {
  echo "${LAUNCH_WORKDIR%/}/logs/train_metrics.jsonl"
}

# read_metrics_size: METRICS_SIZE, the size in bytes of the metrics file (-1: none yet).
read_metrics_size() {
  local out
  if [[ "$LAUNCH_WORKDIR" == gs://* ]]; then
    out=$("$GCLOUD" storage objects describe "$(metrics_url)" --format='value(size)' 2>/dev/null) || out=-1
  else
    out=$(node_ssh "$(node_name 0)" 0 "cd \"$REMOTE_SRC\" 2>/dev/null; stat -c %s $(shell_quote "$(metrics_url)") 2>/dev/null || echo -1" 2>/dev/null) || out=-1
  fi
  METRICS_SIZE=$(tail -n 1 <<<"$out")
  [[ "$METRICS_SIZE" =~ ^-?[0-9]+$ ]] || METRICS_SIZE=-1
}

# run_is_hung: true when the metrics file of a training run (distill, pretrain, finetune:
# the commands that write it) has not changed for HUNG_AFTER seconds (0: never), comparing
# with what earlier checks recorded (RESUME_METRICS_SIZE / _SINCE; launch.sh clears them,
# so a new launch starts the clock).
run_is_hung() {
  local now command="" arg
  if ((HUNG_AFTER == 0 || DRY_RUN)); then return 1; fi
  for arg in "${LAUNCH_ARGS[@]}"; do
    if [[ "$arg" != -* ]]; then command=$arg && break; fi
  done
  case "$command" in distill | pretrain | finetune) ;; *) return 1 ;; esac
  read_metrics_size
  now=$(date +%s)
  if [[ "$METRICS_SIZE" != "${RESUME_METRICS_SIZE:-}" || -z "${RESUME_METRICS_SINCE:-}" ]]; then
    # shellcheck disable=SC2034  # saved by name
    RESUME_METRICS_SIZE=$METRICS_SIZE RESUME_METRICS_SINCE=$now
    state_update RESUME_METRICS_SIZE RESUME_METRICS_SINCE
    return 1
  fi
  STILL_FOR=$((now - RESUME_METRICS_SINCE))
  ((STILL_FOR >= HUNG_AFTER))
}

# ------------------------------------------------------------------ the workers

# check_workers: ask every worker of every slice whether miniend still runs there. Sets
# DEAD (one line per worker where it does not), NOT_INSTALLED (1 when a worker lacks the
# venv: a fresh VM) and WORKERS_SEEN; fails when no worker could be asked.
check_workers() {
  local exit_file pid_file probe out line host status ok=1
  exit_file=$(remote_run_file exit)
  pid_file=$(remote_run_file pid)
  probe="if [ -f \"$exit_file\" ]; then s=\"exited \$(cat \"$exit_file\")\"; elif [ -f \"$pid_file\" ] && kill -0 \"\$(cat \"$pid_file\")\" 2>/dev/null; then s=running; elif [ ! -x \"$REMOTE_VENV/bin/miniend\" ]; then s=not-installed; elif [ -f \"$pid_file\" ]; then s=gone; else s=not-launched; fi; echo \"miniend-worker \$(hostname) \$s\""
  out=$(tpu_ssh all "$probe") || ok=0
  DEAD="" NOT_INSTALLED=0 WORKERS_SEEN=0
  while read -r line host status; do
    [[ "$line" == miniend-worker ]] || continue
    WORKERS_SEEN=$((WORKERS_SEEN + 1))
    case "$status" in
      running) ;;
      "exited 4") DEAD+="  $host: miniend exited with status 4 (hung: its watchdog saw no step finish; every thread's stack ends its log)"$'\n' ;;
      exited*) DEAD+="  $host: miniend exited with status ${status#exited }"$'\n' ;;
      gone) DEAD+="  $host: miniend is gone without an exit status (killed, or the VM restarted)"$'\n' ;;
      not-launched) DEAD+="  $host: miniend was never launched there"$'\n' ;;
      *) DEAD+="  $host: miniend is not installed (a new VM?)"$'\n'; NOT_INSTALLED=1 ;;
    esac
  done <<<"$out"
  if [[ -z "$DEAD" ]] && ((!ok || WORKERS_SEEN == 0)); then
    die "could not check every worker of $NAME (ssh failed); will not relaunch on a guess"
  fi
}

# ------------------------------------------------------------------ what to do

# relaunch_on_ready_tpu WHY: the TPU is ready but the run is not well (WHY says how):
# unless it finished or stopped progressing, stop it wherever it still runs and start it
# again on every worker (reinstalling first on workers that lack it).
relaunch_on_ready_tpu() {
  info "$1"
  read_run_status
  stop_if_finished
  claim_relaunch
  if ((NOT_INSTALLED)); then
    [[ -n "${SETUP_SCP_LOCAL+x}" ]] || die "miniend is not installed on $NAME and no setup is recorded: run tpu_scripts/setup.sh --name $NAME first"
    "$here/setup.sh" --name "$NAME"
  fi
  info "relaunching on every worker (stopping it first where it still runs, so all hosts start together); latest saved step: $RUN_STEP"
  "$here/launch.sh" --name "$NAME" --relaunch --restart
  record_relaunch
  info "relaunched on $NAME; the run continues from the latest checkpoint in $LAUNCH_WORKDIR"
  exit 0
}

# on_ready_tpu: the TPU is READY/ACTIVE: look at the run on every worker.
on_ready_tpu() {
  if ((!launched)); then
    info "nothing launched on $NAME yet (tpu_scripts/launch.sh): nothing to resume"
    exit 0
  fi
  check_workers
  if [[ -n "$DEAD" ]]; then
    relaunch_on_ready_tpu "miniend is not running on every worker of $NAME:"$'\n'"${DEAD%$'\n'}"
  fi
  if run_is_hung; then
    relaunch_on_ready_tpu "miniend runs on all $WORKERS_SEEN workers of $NAME, but $(metrics_url) has not changed for ${STILL_FOR}s (--hung-after $HUNG_AFTER): it is hung"
  fi
  info "miniend runs on all $WORKERS_SEEN workers of $NAME: nothing to do"
  exit 0
}

# recreate_tpu: delete what is left of the TPU (once a stop, suspension or deletion under
# way has finished) and create it again with the recorded flags.
recreate_tpu() {
  local create_flags
  if ! ((DRY_RUN)); then wait_until_settled "$TIMEOUT" "$POLL_INTERVAL"; fi
  if [[ "$STATE" != NOT_FOUND ]]; then
    # A preempted node (or suspended queued resource) keeps its name taken until deleted.
    "$here/teardown.sh" --name "$NAME" --keep-state "${dry[@]}"
  fi
  create_flags=(--name "$NAME" --zone "$ZONE" --accelerator-type "$CREATE_ACCELERATOR_TYPE"
    --runtime-version "$CREATE_RUNTIME_VERSION" --timeout "$TIMEOUT" --poll-interval "$POLL_INTERVAL"
    --remote-user "$REMOTE_USER")
  if [[ -n "$PROJECT" ]]; then create_flags+=(--project "$PROJECT"); fi
  if [[ "$CREATE_SPOT" == 1 ]]; then create_flags+=(--spot); fi
  if [[ "$CREATE_QUEUED" == 1 ]]; then create_flags+=(--queued); fi
  if [[ "${CREATE_INTERNAL_IPS:-0}" == 1 ]]; then create_flags+=(--internal-ips); fi
  if ((NODE_COUNT > 1)); then create_flags+=(--node-count "$NODE_COUNT"); fi
  "$here/create.sh" "${create_flags[@]}" "${dry[@]}" -- "${CREATE_EXTRA_ARGS[@]}"
}

if ((DRY_RUN)); then
  STATE=PREEMPTED
  if [[ "$MODE" == queued ]]; then STATE=SUSPENDED; fi
  echo "# check: $(describe_command)  (dry-run assumes $STATE)"
else
  describe_state
fi
class=$(state_class "$STATE")
info "$NAME is $STATE ($class)"
if ((RECREATE)) && [[ "$class" == ready || "$class" == unknown ]]; then
  info "re-creating $NAME on request (--recreate)"
  class=failed
fi

case "$class" in
  ready) on_ready_tpu ;;
  pending | gone | failed) ;;
  *) die "$NAME is in state '$STATE', which these scripts do not know; check it with: $(describe_command) (resume.sh --watch re-creates it after --recreate-after failed rounds)" ;;
esac

# The TPU is gone or not up yet (and a local work directory with it): only a gs:// work
# directory can tell whether the run finished or progressed.
RUN_STEP=-1 RUN_FINISHED=0
if ((launched)) && [[ "$LAUNCH_WORKDIR" == gs://* ]]; then
  if ((DRY_RUN)); then
    echo "# check the run: $GCLOUD storage cat ${LAUNCH_WORKDIR%/}/summary.json; $GCLOUD storage ls ${LAUNCH_WORKDIR%/}/checkpoints/"
  else
    read_run_status
  fi
fi
stop_if_finished
if ((launched && !DRY_RUN)); then claim_relaunch; fi

if [[ "$class" == pending ]]; then
  # A create (or repair) is under way: wait for it, then set up and launch below.
  wait_until_ready "$TIMEOUT" "$POLL_INTERVAL"
else
  recreate_tpu
fi

# A fresh TPU has empty disks: install the code again, then start the same command.
if [[ -z "${SETUP_SCP_LOCAL+x}" ]]; then
  info "no setup recorded for $NAME: run tpu_scripts/setup.sh and launch.sh yourself"
  exit 0
fi
"$here/setup.sh" --name "$NAME" "${dry[@]}"
if ((!launched)); then
  info "no launch recorded for $NAME: run tpu_scripts/launch.sh yourself"
  exit 0
fi
"$here/launch.sh" --name "$NAME" --relaunch "${dry[@]}"
record_relaunch
if ! ((DRY_RUN)); then
  info "resumed $NAME; the run continues from the latest checkpoint in $LAUNCH_WORKDIR"
fi
