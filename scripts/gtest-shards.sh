# Sourced by sanitize.sh and arm64-check.sh: one GoogleTest binary run as concurrent shards.
# Most tests are single-threaded, so one process under a sanitizer or qemu keeps one core busy
# and leaves the rest idle; GoogleTest's sharding (GTEST_TOTAL_SHARDS, GTEST_SHARD_INDEX) splits
# the selected tests into disjoint sets, one process each, run side by side.
#
#   gtest_shards LOG COMMAND...
# runs COMMAND (a test binary and its arguments, behind any wrapper: timeout, qemu) as
# MSDA_TEST_SHARDS processes (default: the number of cores), shard i writing LOG.i, then appends
# every shard's log to LOG in order. Returns the first non-zero status of a shard, else 0; the
# last lines of each failing shard's log are printed to stderr (LOG's own tail is the last
# shard's).
#   gtest_ran LOG
# prints "N tests ran in S shards", N summed over the shards in LOG.

gtest_shards() {
  local log=$1
  shift
  local shards=${MSDA_TEST_SHARDS:-$(nproc)}
  if ! [[ $shards =~ ^[1-9][0-9]*$ ]]; then
    echo "gtest_shards: MSDA_TEST_SHARDS must be a whole number of at least 1, got '$shards'" >&2
    return 2
  fi
  local pids=() i status=0 s
  for ((i = 0; i < shards; ++i)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i "$@" >"$log.$i" 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < shards; ++i)); do
    wait "${pids[$i]}"
    s=$?
    if ((s != 0)); then
      echo "gtest_shards: shard $i of $shards exited with status $s; its log ends:" >&2
      tail -n 40 "$log.$i" >&2
      ((status == 0)) && status=$s
    fi
  done
  : >"$log"
  for ((i = 0; i < shards; ++i)); do
    cat "$log.$i" >>"$log"
    rm -f "$log.$i"
  done
  return $status
}

gtest_ran() {
  grep -Eo '[0-9]+ tests? from [0-9]+ test suites? ran' "$1" |
    awk '{ tests += $1 } END { if (NR) printf "%d tests ran in %d shards", tests, NR }'
}
