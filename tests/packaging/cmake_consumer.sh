#!/usr/bin/env bash
# Installs the C++ part of a build tree (`cmake --install BUILD --component cpp`) into a fresh
# prefix, then configures, builds and runs tests/consumer against it: find_package(msda) and
# msda::msda must work from the installed files alone.
# Usage: cmake_consumer.sh BUILD_DIR WORK_DIR
set -euo pipefail
build=$1 work=$2
source_dir=$(cd "$(dirname "$0")/../consumer" && pwd)
rm -rf "$work"
cmake --install "$build" --component cpp --prefix "$work/prefix" >/dev/null
test -f "$work/prefix/include/msda/msda.h"
cmake -S "$source_dir" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" >/dev/null
"$work/build/consumer"
