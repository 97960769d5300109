#!/usr/bin/env bash
# Create the contad work pools on the Prefect server at PREFECT_API_URL and register the
# deployments of infra/prefect.yaml for one pool set.
#
#   infra/deploy.sh cpu|gpu|all
#
# Environment (defaults in brackets): PREFECT_API_URL (required), CONTAD_HOME [this checkout]
# = where workers find the code, CONTAD_PARAMS [$CONTAD_HOME/params.yaml] = the plant's params
# file as workers see it, CONTAD_RUNS [$CONTAD_HOME/runs] = run directories (shared storage),
# PREFECT [prefect on PATH, else the venv's].
# Idempotent: existing pools are updated (the GPU pool's base job template is re-applied) and
# deployments are upserted.
set -euo pipefail

which_set="${1:-cpu}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
export CONTAD_HOME="${CONTAD_HOME:-$repo}"
export CONTAD_PARAMS="${CONTAD_PARAMS:-$CONTAD_HOME/params.yaml}"
export CONTAD_RUNS="${CONTAD_RUNS:-$CONTAD_HOME/runs}"
if [[ -z "${PREFECT:-}" ]]; then
  if command -v prefect >/dev/null 2>&1; then PREFECT=prefect; else PREFECT="$repo/.venv/bin/prefect"; fi
fi

pool() {  # pool NAME TYPE [--base-job-template FILE]
  local name="$1" type="$2"; shift 2
  if "$PREFECT" work-pool inspect "$name" >/dev/null 2>&1; then
    if [[ $# -gt 0 ]]; then "$PREFECT" work-pool update "$name" "$@"; fi
  else
    "$PREFECT" work-pool create "$name" --type "$type" "$@"
  fi
}

case "$which_set" in
  cpu) pattern='*-cpu' ;;
  gpu) pattern='*-gpu' ;;
  all) pattern='*' ;;
  *) echo "usage: $0 cpu|gpu|all" >&2; exit 2 ;;
esac
if [[ "$which_set" != gpu ]]; then pool contad-cpu process; fi
if [[ "$which_set" != cpu ]]; then pool contad-gpu kubernetes --base-job-template "$here/contad-gpu-job-template.json"; fi

cd "$repo"
"$PREFECT" --no-prompt deploy --prefect-file "$here/prefect.yaml" --name "$pattern"
