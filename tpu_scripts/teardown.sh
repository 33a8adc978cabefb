#!/usr/bin/env bash
# Delete a TPU VM / pod slice (or its queued resource) created by create.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: teardown.sh --name NAME [options]

Delete the TPU VM (`gcloud compute tpus tpu-vm delete --quiet`) or, for --queued ones,
the queued resource together with its node(s) (`queued-resources delete --force --quiet`;
for multi-slice ones, every slice).
The gs:// work directory (checkpoints, metrics) is not touched.

Options:
  --name NAME         TPU node name given to create.sh (required)
  --queued            it is a queued resource (default: as recorded by create.sh)
  --keep-state        keep ~/.miniend_tpu/NAME.env (by default it is removed, so a
                      later resume.sh does not bring the TPU back)
  --zone ZONE         default: as given to create.sh
  --project PROJECT   default: as given to create.sh
  --dry-run           Print the gcloud command instead of running it
  -h, --help          Show this help

Examples:
  tpu_scripts/teardown.sh --name miniend-v4-8
  tpu_scripts/teardown.sh --name miniend-v5p-32 --zone us-east5-a --queued
USAGE
}

NAME="" ZONE="" PROJECT="" MODE=vm QUEUED=0 KEEP_STATE=0
while (($#)); do
  case "$1" in
    --queued) QUEUED=1 FLAG_SHIFT=1 ;;
    --keep-state) KEEP_STATE=1 FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

resolve_existing_tpu
if ((QUEUED)); then MODE=queued; fi
set_gcloud_flags

if [[ "$MODE" == queued ]]; then
  # --force also deletes the node the queued resource created.
  gcloud_tpu queued-resources delete "$NAME" --force --quiet
else
  gcloud_tpu tpu-vm delete "$NAME" --quiet
fi
if ! ((DRY_RUN || KEEP_STATE)); then
  rm -f "$(state_file "$NAME")"
fi
if ! ((DRY_RUN)); then
  info "deleted $NAME; the gs:// work directory and its checkpoints are kept"
fi
