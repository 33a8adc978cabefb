#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for miniend_jax and wait until it can be used.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Create a TPU VM (single host, e.g. v4-8), a pod slice (several hosts, e.g. v5p-32) or
several slices of one type (multi-slice, --node-count) and wait until it is READY (queued
resources: ACTIVE).

Required:
  --name NAME               TPU node name (lowercase, digits, '-'), e.g. miniend-v4-8
  --zone ZONE               e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-8

Options:
  --project PROJECT         GCP project (default: gcloud's configured project)
  --runtime-version V       TPU VM image. Default by generation:
                              v2/v3/v4 -> tpu-ubuntu2204-base
                              v5e (v5litepod) -> v2-alpha-tpuv5-lite
                              v5p -> v2-alpha-tpuv5
                              v6e -> v2-alpha-tpuv6e
  --spot                    Spot capacity: much cheaper, can be preempted at any time
                            (resume.sh brings the run back from its last checkpoint).
  --queued                  Use a queued resource (gcloud compute tpus queued-resources):
                            the request waits in a queue until capacity exists instead of
                            failing; the usual way to get large slices. Combines with --spot.
  --internal-ips            Workers without external IP addresses (gcloud --internal-ips).
                            The other scripts then reach them through IAP (gcloud alpha
                            ... ssh --tunnel-through-iap) unless MINIEND_TPU_SSH_FLAGS says
                            otherwise, and the workers need Cloud NAT to download Python,
                            packages and a --repo clone (see tpu_scripts/README.md).
  --remote-user USER        Login on the workers (default: your local login, as gcloud's
                            default); recorded, so every later script, run from any local
                            login, uses USER@NAME.
  --node-count N            Multi-slice: N slices of TYPE joined over the data-center network
                            (N >= 2; implies --queued). gcloud names the slices NAME-0 ...
                            NAME-(N-1) (--node-prefix NAME); setup.sh, launch.sh and logs.sh
                            act on every worker of every slice, teardown.sh deletes them all.
  --timeout SECONDS         Give up waiting for READY/ACTIVE after this long (default 3600;
                            0 waits forever). The TPU is not deleted on timeout.
  --poll-interval SECONDS   Seconds between state checks (default 30).
  --no-wait                 Return right after the create request.
  --dry-run                 Print the gcloud commands instead of running them.
  -h, --help                Show this help.
  -- FLAGS...               Passed to the gcloud create command unchanged
                            (e.g. -- --network my-vpc --reserved --valid-until-duration 12h).

The flags are remembered in ~/.miniend_tpu/NAME.env so setup.sh, launch.sh, logs.sh,
resume.sh and teardown.sh only need --name.

Examples:
  tpu_scripts/create.sh --name miniend-v4-8 --zone us-central2-b --accelerator-type v4-8 --spot
  tpu_scripts/create.sh --name miniend-v5p-32 --zone us-east5-a --accelerator-type v5p-32 --queued --spot
  tpu_scripts/create.sh --name miniend-v4-32 --zone us-central2-b --accelerator-type v4-32 --internal-ips
  tpu_scripts/create.sh --name miniend-2xv5e-256 --zone us-west4-a --accelerator-type v5litepod-256 \
    --node-count 2 --spot
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" RUNTIME_VERSION=""
SPOT=0 QUEUED=0 TIMEOUT=3600 POLL_INTERVAL=30 WAIT=1 NODE_COUNT=1 INTERNAL_IPS=0 REMOTE_USER=""
EXTRA_ARGS=()
while (($#)); do
  case "$1" in
    --accelerator-type | --accelerator-type=*) flag_value "$@"; ACCELERATOR_TYPE=$FLAG_VALUE ;;
    --runtime-version | --runtime-version=*) flag_value "$@"; RUNTIME_VERSION=$FLAG_VALUE ;;
    --timeout | --timeout=*) flag_value "$@"; TIMEOUT=$FLAG_VALUE ;;
    --node-count | --node-count=*) flag_value "$@"; NODE_COUNT=$FLAG_VALUE ;;
    --poll-interval | --poll-interval=*) flag_value "$@"; POLL_INTERVAL=$FLAG_VALUE ;;
    --remote-user | --remote-user=*) flag_value "$@"; REMOTE_USER=$FLAG_VALUE ;;
    --spot) SPOT=1 FLAG_SHIFT=1 ;;
    --internal-ips) INTERNAL_IPS=1 FLAG_SHIFT=1 ;;
    --queued) QUEUED=1 FLAG_SHIFT=1 ;;
    --no-wait) WAIT=0 FLAG_SHIFT=1 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_flag "$NAME" --name miniend-v4-8
require_flag "$ZONE" --zone us-central2-b
require_flag "$ACCELERATOR_TYPE" --accelerator-type v4-8
validate_name "$NAME"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout must be a whole number of seconds, got '$TIMEOUT'"
[[ "$POLL_INTERVAL" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "--poll-interval must be a number of seconds, got '$POLL_INTERVAL'"
if [[ -z "$RUNTIME_VERSION" ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    usage_error "no default runtime for accelerator type '$ACCELERATOR_TYPE'; pass --runtime-version (e.g. --runtime-version tpu-ubuntu2204-base)"
fi
[[ "$NODE_COUNT" =~ ^[1-9][0-9]*$ ]] || usage_error "--node-count must be a positive whole number, got '$NODE_COUNT'"
# Multi-slice needs a queued resource; its nodes are NAME-0, NAME-1, ...: keep those valid too.
if ((NODE_COUNT > 1)); then
  QUEUED=1
  validate_name "$NAME-$((NODE_COUNT - 1))"
fi
if ((QUEUED)); then MODE=queued; else MODE=vm; fi
set_gcloud_flags
# shellcheck disable=SC2034  # read by resolve_remote_access
CREATE_INTERNAL_IPS=$INTERNAL_IPS
resolve_remote_access

create_flags=()
if ((SPOT)); then create_flags+=(--spot); fi
if ((INTERNAL_IPS)); then create_flags+=(--internal-ips); fi

# Remember the flags first, so resume.sh/teardown.sh work even if this script is
# interrupted while waiting. setup.sh and launch.sh add their own keys later.
if ! ((DRY_RUN)); then
  # shellcheck disable=SC2034  # saved by name
  CREATE_ZONE=$ZONE CREATE_PROJECT=$PROJECT CREATE_ACCELERATOR_TYPE=$ACCELERATOR_TYPE
  # shellcheck disable=SC2034
  CREATE_RUNTIME_VERSION=$RUNTIME_VERSION CREATE_SPOT=$SPOT CREATE_QUEUED=$QUEUED
  # shellcheck disable=SC2034
  CREATE_NODE_COUNT=$NODE_COUNT CREATE_EXTRA_ARGS=("${EXTRA_ARGS[@]}")
  state_save "$NAME" CREATE_ZONE CREATE_PROJECT CREATE_ACCELERATOR_TYPE CREATE_RUNTIME_VERSION \
    CREATE_SPOT CREATE_QUEUED CREATE_NODE_COUNT CREATE_INTERNAL_IPS CREATE_EXTRA_ARGS
  remember_remote_access "$NAME"
fi

if [[ "$MODE" == queued ]]; then
  # The queued resource and its node share the name: one thing for users to remember.
  # Multi-slice: its nodes are NAME-0 ... NAME-(N-1), linked by the TPU runtime (MEGASCALE_*).
  node_flags=(--node-id "$NAME")
  if ((NODE_COUNT > 1)); then node_flags=(--node-count "$NODE_COUNT" --node-prefix "$NAME"); fi
  gcloud_tpu queued-resources create "$NAME" "${node_flags[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" \
    "${create_flags[@]}" "${EXTRA_ARGS[@]}"
else
  gcloud_tpu tpu-vm create "$NAME" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" \
    "${create_flags[@]}" "${EXTRA_ARGS[@]}"
fi

if ! ((WAIT)); then exit 0; fi
want=$(ready_state)
if ((DRY_RUN)); then
  echo "# then poll every ${POLL_INTERVAL}s (timeout ${TIMEOUT}s) until $want: $(describe_command)"
  exit 0
fi

wait_until_ready "$TIMEOUT" "$POLL_INTERVAL"
info "$NAME is $want. Next: tpu_scripts/setup.sh --name $NAME --repo URL_THE_WORKERS_CAN_CLONE (or --scp-local)"
