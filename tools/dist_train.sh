#!/usr/bin/env bash
# Distributed training: torchrun starts GPUS processes per node and mmengine's
# launcher (--launcher pytorch) sets up DDP.
#   bash tools/dist_train.sh CONFIG GPUS [train.py args...]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. CPU-only (gloo):
#   bash tools/dist_train.sh CONFIG 2 --cfg-options env_cfg.dist_cfg.backend=gloo
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG GPUS [train.py options]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-python}

# torchrun through mmrepvgg/utils/dist.py:torchrun_main: the same launcher, but
# a failed worker (which already printed its one "error: ..." line) ends the
# script with the worker's exit code instead of torchrun's traceback.
PYTHONPATH="$HERE/..:${PYTHONPATH:-}" \
exec "$PYTHON" -c 'import runpy, sys; runpy.run_path(sys.argv.pop(1))["torchrun_main"]()' \
  "$HERE/../mmrepvgg/utils/dist.py" \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$GPUS" --master_port="$PORT" \
  "$HERE/train.py" "$CONFIG" --launcher pytorch "$@"
