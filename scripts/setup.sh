#!/usr/bin/env bash
# On a fresh Debian 12 machine: install what is missing, build, and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
build/examples/msda_demo "$@"
