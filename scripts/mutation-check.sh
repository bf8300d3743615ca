#!/usr/bin/env bash
# The reach of the emulated CUDA suite, measured: plants each bug of a mutation list
# (tests/mutations/cuda.txt: plausible one-line bugs in src/cuda/) one at a time in a copy of src/
# (BUILD/mutation-src: src/ itself is never written), rebuilds the emulated CUDA tests from that
# copy (tests/msda_cuda_emulated_tests: the backend's one translation unit and a link; the library
# and everything else stay as built) and requires the suite to fail, as is or with one block per
# launch and 3 records per chunk (the second CTest registration). Prints a table of each mutation
# and the first tests that caught it; exits non-zero if the unmutated suite fails, a mutation's
# line is not found exactly once, a mutation does not compile, or one survives.
#
#   scripts/mutation-check.sh [LIST...]   every mutation (default list: tests/mutations/cuda.txt),
#                                         in build-mutation/ (configured and built first: minutes);
#                                         ~45 s a mutation here (a 30 s compile, then the suite)
#   scripts/mutation-check.sh --ci        the mutations marked "ci: yes" (the six gaps issue 25
#                                         named), in build/ as scripts/test.sh
#                                         left it (which ran the unmutated suite): CI's bounded run
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
ci=0
if [[ ${1:-} == --ci ]]; then
  ci=1
  shift
fi
lists=("$@")
[[ ${#lists[@]} -gt 0 ]] || lists=(tests/mutations/cuda.txt)
# Seconds a run may take (each of the two): 4x the unmutated suite here; 90 s in CI, whose budget
# is tight (a hanging mutation costs a whole timeout). MSDA_MUTATION_TIMEOUT overrides.
per_run_timeout=${MSDA_MUTATION_TIMEOUT:-120}

if ((ci)); then
  build=build
  per_run_timeout=${MSDA_MUTATION_TIMEOUT:-90}
  [[ -x $build/tests/msda_cuda_emulated_tests ]] ||
    { echo "mutation-check --ci: $build/tests/msda_cuda_emulated_tests not built: run scripts/test.sh first" >&2; exit 1; }
else
  build=build-mutation
  scripts/install-deps.sh >/dev/null
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMSDA_CUDA=OFF -DMSDA_BUILD_TORCH=OFF \
    -DMSDA_BUILD_BENCHMARKS=OFF -DMSDA_BUILD_EXAMPLES=OFF >/dev/null
fi
exe=$build/tests/msda_cuda_emulated_tests
copy=$PWD/$build/mutation-src
rm -rf "$copy" && cp -a src "$copy"

# use_copy 1|0: the emulated backend compiles from the copy, or again from src/.
use_copy() {
  cmake -S . -B "$build" -DMSDA_CUDA_EMULATION_SOURCE="$( (($1)) && echo "$copy")" >/dev/null
}
build_suite() { cmake --build "$build" -j"$(nproc)" --target msda_cuda_emulated_tests >"$build/mutation-build.log" 2>&1; }

# run_suite: 0 when every test passes in both configurations; the failed tests' names on stdout.
# A run past the timeout (the unmutated suite takes ~27 s here) counts as caught, as CTest's
# timeout would fail it: a stride that forgets a factor can make the loops crawl rather than fail.
# The two configurations run side by side (the emulator is single-threaded); the first to fail
# ends the other, and a mutation only the small grid catches no longer waits for a whole run of
# the other first.
run_suite() {
  local log=$build/mutation-run.log small_log=$build/mutation-run-small.log rc=0 grid="" pid small_pid done_pid s
  timeout -k 10 "$per_run_timeout" "$exe" --gtest_brief=1 --gtest_fail_fast >"$log" 2>&1 &
  pid=$!
  MSDA_CUDA_MAX_BLOCKS=1 MSDA_CUDA_CHUNK_RECORDS=3 timeout -k 10 "$per_run_timeout" "$exe" --gtest_brief=1 \
    --gtest_fail_fast >"$small_log" 2>&1 &
  small_pid=$!
  local running=("$pid" "$small_pid") left p
  while ((${#running[@]} > 0)); do
    s=0
    wait -n -p done_pid "${running[@]}" || s=$?
    left=()
    for p in "${running[@]}"; do [[ $p == "$done_pid" ]] || left+=("$p"); done
    running=("${left[@]}")
    if ((s != 0)); then
      rc=$s
      if [[ $done_pid == "$small_pid" ]]; then
        grid=" (small grid)"
        log=$small_log
      fi
      if ((${#running[@]} > 0)); then
        kill "${running[@]}" 2>/dev/null || true
        wait "${running[@]}" 2>/dev/null || true
      fi
      break
    fi
  done
  if ((rc == 124 || rc == 137)); then
    echo "timed out after $per_run_timeout s$grid"
  elif ((rc != 0)); then
    { grep -o '\[  FAILED  \] [A-Za-z0-9_./]*' "$log" | sed 's/\[  FAILED  \] //' | sort -u | head -n 3 |
      sed "s/\$/$grid/" | paste -sd, -; } || true
  fi
  return $rc
}

# At exit, however it ends: the build compiles from src/ again and the emulated tests are rebuilt
# from it (no mutant binary is left behind for a later ctest), and the copy goes. An interrupt
# exits (the EXIT trap then cleans up once). Killed outright, the trap cannot run: scripts/build.sh
# resets MSDA_CUDA_EMULATION_SOURCE on its next run.
cleanup() {
  use_copy 0 || true
  build_suite || echo "mutation-check: rebuilding the emulated tests from src/ failed (see $build/mutation-build.log)" >&2
  rm -rf "$copy"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
use_copy 1
echo "mutation-check: the unmutated suite, built from the copy"
build_suite || { cat "$build/mutation-build.log"; echo "mutation-check: the unmutated suite does not build" >&2; exit 1; }
if ((ci)); then
  echo "(not run again: scripts/test.sh ran it, as is and with the small grid)"
elif ! failed=$(run_suite); then
  echo "mutation-check: the unmutated suite fails: $failed" >&2
  exit 1
fi

# The mutations, as tab-separated id, what, file, from, to (one per line).
mutations=$(python3 - "$ci" "${lists[@]}" <<'PY'
import sys
ci_only = sys.argv[1] == "1"
for path in sys.argv[2:]:
    block = {}
    def flush():
        if block:
            missing = [k for k in ("id", "what", "file", "from", "to") if k not in block]
            if missing:
                sys.exit(f"{path}: mutation {block.get('id', '?')} lacks {', '.join(missing)}")
            if block.get("ci", "no") not in ("yes", "no"):
                sys.exit(f"{path}: mutation {block['id']}: ci must be yes or no")
            if not ci_only or block.get("ci") == "yes":
                print("\t".join(block[k] for k in ("id", "what", "file", "from", "to")))
            block.clear()
    for line in open(path).read().split("\n"):
        if line.startswith("#"):
            continue
        if not line.strip():
            flush()
            continue
        key, _, value = line.partition(": ")
        if key not in ("id", "what", "file", "from", "to", "ci"):
            sys.exit(f"{path}: unexpected line {line!r}")
        block[key] = value
    flush()
PY
)

[[ -n $mutations ]] || { echo "mutation-check: no mutations in ${lists[*]}" >&2; exit 1; }
survivors=0 broken=0 count=0
printf '\n| mutation | the bug | caught by | s |\n|---|---|---|---:|\n'
while IFS=$'\t' read -r id what file from to; do
  count=$((count + 1))
  t0=$SECONDS
  # Only the backend's source and the headers it includes reach the emulated translation unit.
  if [[ $file != src/cuda/*.inl && $file != src/cuda/*.h ]]; then
    printf '| %s | %s | NOT A FILE THE EMULATED BACKEND COMPILES (src/cuda/*.inl, *.h): %s | |\n' "$id" "$what" "$file"
    broken=$((broken + 1))
    continue
  fi
  target=$copy/${file#src/}
  # Exactly one whole line must match: the list names a line, not a fragment of several.
  if ! python3 - "$file" "$target" "$from" "$to" <<'PY'
import sys
source, target, old, new = sys.argv[1:]
lines = open(source).read().split("\n")
hits = [i for i, l in enumerate(lines) if l == old]
if len(hits) != 1:
    sys.exit(1)
lines[hits[0]] = new
open(target, "w").write("\n".join(lines))
PY
  then
    printf '| %s | %s | LINE NOT FOUND EXACTLY ONCE in %s |\n' "$id" "$what" "$file"
    broken=$((broken + 1))
    continue
  fi
  if ! build_suite; then
    t1=$SECONDS
    printf '| %s | %s | DOES NOT COMPILE | %d |\n' "$id" "$what" $((SECONDS - t0))
    broken=$((broken + 1))
  elif t1=$SECONDS && failed=$(run_suite); then
    printf '| %s | %s | **SURVIVED** | %d |\n' "$id" "$what" $((SECONDS - t0))
    survivors=$((survivors + 1))
  else
    printf '| %s | %s | %s (build %d s) | %d |\n' "$id" "$what" "${failed:-(a crash)}" $((t1 - t0)) $((SECONDS - t0))
  fi
  cp "$file" "$target"
done <<<"$mutations"

echo
echo "mutation-check: $count mutations, $survivors survived, $broken not applicable; $((SECONDS - started)) s"
[[ $survivors -eq 0 && $broken -eq 0 ]]
