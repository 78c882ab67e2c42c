#!/usr/bin/env bash
# Gather what benchmarks/gpu.sh needs on the device machine, which reaches no package index: Eigen's
# headers and CMake config (.deps/) and the peers' wheels for Python 3.12 (.whl/). Both are git-ignored;
# name them in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/eigen/share/eigen3 .deps/eigen/include .whl
cp -r /usr/share/eigen3/cmake .deps/eigen/share/eigen3/
cp -r /usr/include/eigen3 .deps/eigen/include/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 opacus==1.6.0
