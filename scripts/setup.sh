#!/usr/bin/env bash
# Sets up a development environment on a fresh Debian machine: the system packages the build needs,
# a virtualenv in .venv with torch (CPU build) and dpkd installed editable with its test extras.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in g++ cmake ninja-build ccache libgtest-dev libeigen3-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# Always pin torch: unpinned, pip would pull a multi-GB CUDA build.
.venv/bin/pip install -q "torch==${DPKD_TORCH_VERSION:-2.13.0}" "scikit-build-core>=0.10" "pybind11>=2.12" numpy
# Build against that torch, not a second copy in an isolated build environment.
.venv/bin/pip install -q --no-build-isolation -e ".[test]"
