#!/usr/bin/env bash
# Idempotent environment set-up for mmrepvgg (called by `make demo` / `make test`).
#
# Creates .venv/ inside the repository, installs torch, mmengine, mmcv (with compiled ops,
# built once into a wheel cache outside the repository), mmdet, the test/ONNX/OpenVINO extras and this
# package in editable mode. A second run on the same machine is a no-op unless the inputs changed.
#
# Overrides (environment variables):
#   PYTHON               interpreter used to create the venv          (default: python3.11, else python3)
#   MMREPVGG_TORCH       pip requirement for torch                    (default: torch==2.13.0)
#                        e.g. MMREPVGG_TORCH='torch==2.4.1' with a CUDA index for a GPU box
#   MMREPVGG_PIP_ARGS    extra pip arguments for the torch install    (e.g. --index-url ...)
#   MMREPVGG_WHEEL_CACHE where built mmcv wheels are kept             (default: ~/.cache/mmrepvgg/wheels)
#   MMREPVGG_VENV        location of the virtual environment          (default: <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMREPVGG_VENV:-$ROOT/.venv}"
TORCH_REQ="${MMREPVGG_TORCH:-torch==2.13.0}"
MMCV_VERSION="2.1.0"
CACHE="${MMREPVGG_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmrepvgg/wheels}"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

log() { printf '[setup] %s\n' "$*" >&2; }

# The stamp records every input of the set-up; when it matches, there is nothing to do.
STAMP="$VENV/.mmrepvgg-setup"
KEY="$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/setup.py" "$ROOT/requirements"/*.txt 2>/dev/null | sha256sum | cut -c1-16) torch=$TORCH_REQ python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

log "installing build tools"
"${PIP[@]}" install -q "setuptools>=77.0.3,<81" wheel ninja numpy
log "installing $TORCH_REQ"
# shellcheck disable=SC2086
"${PIP[@]}" install -q "$TORCH_REQ" ${MMREPVGG_PIP_ARGS:-}

TORCH_V="$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
CUDA_TAG="$("$PY" -c 'import torch; print("cu" + torch.version.cuda.replace(".", "") if torch.version.cuda and torch.cuda.is_available() else "cpu")')"
WHEEL_DIR="$CACHE/mmcv-${MMCV_VERSION}_torch-${TORCH_V}_${PY_TAG}_${CUDA_TAG}"
if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $MMCV_VERSION with ops for torch $TORCH_V ($CUDA_TAG, $PY_TAG): about 11-15 minutes on 2 cores, once per machine"
  mkdir -p "$CACHE"
  TMP_DIR="$(mktemp -d "$CACHE/.build.XXXXXX")"
  trap 'rm -rf "$TMP_DIR"' EXIT
  # mmcv's setup.py imports torch and pkg_resources: no build isolation.
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$TMP_DIR" "mmcv==$MMCV_VERSION"
  rm -rf "$WHEEL_DIR"
  mv "$TMP_DIR" "$WHEEL_DIR"   # atomic: a cache entry is either complete or absent
  trap - EXIT
else
  log "using cached mmcv wheel from $WHEEL_DIR"
fi
"${PIP[@]}" install -q "$WHEEL_DIR"/mmcv-*.whl

log "installing mmengine, mmdet, test, ONNX and OpenVINO extras, and mmrepvgg (editable)"
"${PIP[@]}" install -q -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt" \
  -r "$ROOT/requirements/openvino.txt"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
"$PY" -c 'import mmcv.ops, mmdet, mmengine, mmrepvgg; print("[setup] ok: mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmengine", mmengine.__version__)'
echo "$KEY" > "$STAMP"
