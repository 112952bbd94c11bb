#!/usr/bin/env bash
# Federated SH-PEFT on one machine the way hospitals run it: a TLS SuperLink with SuperNode
# authentication, N registered SuperNodes (each with its own datalist and local weights), `flwr run`.
# Everything (certificates, keys, FLWR_HOME, logs, the global delta) goes under WORKDIR.
#   scripts/fed_deploy.sh [WORKDIR] [N] [extra args of `python -m shpeft_monai.fl.deploy`]
# Example (tiny, a few minutes on 2 cores):
#   scripts/fed_deploy.sh runs/fed-deploy 2 --train-per-site 32 --run-config num-server-rounds=2
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/fed-deploy}
N=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
PY=${PY:-.venv/bin/python}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PATH="$(dirname "$PY"):$PATH"
exec "$PY" -m shpeft_monai.fl.deploy --workdir "$WORKDIR" --supernodes "$N" "$@"
