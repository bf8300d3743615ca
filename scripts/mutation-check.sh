#!/usr/bin/env bash
# The reach of the emulated CUDA suite, measured: plants each bug of a mutation list
# (tests/mutations/cuda.txt: plausible one-line bugs in src/cuda/) one at a time, rebuilds the
# emulated CUDA tests (tests/msda_cuda_emulated_tests: the backend's one translation unit and a
# small link) in build-mutation/, and requires the suite to fail, as is or with one block per
# launch and 3 records per chunk (the second CTest registration). Prints a table of each
# mutation and the first tests that caught it; exits non-zero if the unmutated suite fails, a
# mutation's line is not found exactly once, a mutation does not compile, or one survives.
#
#   scripts/mutation-check.sh [LIST...]     default: tests/mutations/cuda.txt
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
lists=("$@")
[[ ${#lists[@]} -gt 0 ]] || lists=(tests/mutations/cuda.txt)
build=build-mutation
exe=$build/tests/msda_cuda_emulated_tests
per_run_timeout=${MSDA_MUTATION_TIMEOUT:-300}

scripts/install-deps.sh >/dev/null
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMSDA_CUDA=OFF -DMSDA_BUILD_TORCH=OFF \
  -DMSDA_BUILD_BENCHMARKS=OFF -DMSDA_BUILD_EXAMPLES=OFF >/dev/null

build_suite() { cmake --build "$build" -j"$(nproc)" --target msda_cuda_emulated_tests >"$build/mutation-build.log" 2>&1; }

# run_suite: 0 when every test passes in both configurations; the failed tests' names on stdout.
run_suite() {
  local log=$build/mutation-run.log status=0
  timeout -k 10 "$per_run_timeout" "$exe" --gtest_brief=1 --gtest_fail_fast >"$log" 2>&1 || status=1
  if [[ $status -eq 0 ]]; then
    MSDA_CUDA_MAX_BLOCKS=1 MSDA_CUDA_CHUNK_RECORDS=3 timeout -k 10 "$per_run_timeout" "$exe" --gtest_brief=1 \
      --gtest_fail_fast >"$log" 2>&1 || status=1
    [[ $status -eq 0 ]] || sed -i 's/$/ (small grid)/' "$log"
  fi
  grep -o '\[  FAILED  \] [A-Za-z0-9_./]*' "$log" | sed 's/\[  FAILED  \] //' | sort -u | head -n 3 | paste -sd, - || true
  [[ -s $log ]] && grep -q 'Timeout\|timed out' "$log" && echo "(timeout)"
  return $status
}

echo "mutation-check: the unmutated suite"
build_suite || { cat "$build/mutation-build.log"; echo "mutation-check: the unmutated suite does not build" >&2; exit 1; }
if ! failed=$(run_suite); then
  echo "mutation-check: the unmutated suite fails: $failed" >&2
  exit 1
fi

# The mutations, as tab-separated id, what, file, from, to (one per line).
mutations=$(python3 - "${lists[@]}" <<'PY'
import sys
for path in sys.argv[1:]:
    block = {}
    def flush():
        if block:
            missing = [k for k in ("id", "what", "file", "from", "to") if k not in block]
            if missing:
                sys.exit(f"{path}: mutation {block.get('id', '?')} lacks {', '.join(missing)}")
            print("\t".join(block[k] for k in ("id", "what", "file", "from", "to")))
            block.clear()
    for line in open(path).read().split("\n"):
        if line.startswith("#"):
            continue
        if not line.strip():
            flush()
            continue
        key, _, value = line.partition(": ")
        if key not in ("id", "what", "file", "from", "to"):
            sys.exit(f"{path}: unexpected line {line!r}")
        block[key] = value
    flush()
PY
)

backup=$(mktemp)
current=""
restore() { [[ -n $current ]] && cp "$backup" "$current" && current=""; }
trap 'restore; rm -f "$backup"' EXIT INT TERM

survivors=0 broken=0 count=0
printf '\n| mutation | the bug | caught by |\n|---|---|---|\n'
while IFS=$'\t' read -r id what file from to; do
  count=$((count + 1))
  # Exactly one whole line must match: the list names a line, not a fragment of several.
  if ! python3 - "$file" "$from" "$to" <<'PY'
import sys
path, old, new = sys.argv[1:]
lines = open(path).read().split("\n")
hits = [i for i, l in enumerate(lines) if l == old]
if len(hits) != 1:
    sys.exit(1)
lines[hits[0]] = new
open(path + ".mutated", "w").write("\n".join(lines))
PY
  then
    printf '| %s | %s | LINE NOT FOUND EXACTLY ONCE in %s |\n' "$id" "$what" "$file"
    broken=$((broken + 1))
    continue
  fi
  cp "$file" "$backup"
  current=$file
  mv "$file.mutated" "$file"
  if ! build_suite; then
    printf '| %s | %s | DOES NOT COMPILE |\n' "$id" "$what"
    broken=$((broken + 1))
  elif failed=$(run_suite); then
    printf '| %s | %s | **SURVIVED** |\n' "$id" "$what"
    survivors=$((survivors + 1))
  else
    printf '| %s | %s | %s |\n' "$id" "$what" "${failed:-(a crash)}"
  fi
  restore
done <<<"$mutations"
build_suite  # leave the build as the sources are

echo
echo "mutation-check: $count mutations, $survivors survived, $broken not applicable; $((SECONDS - started)) s"
[[ $survivors -eq 0 && $broken -eq 0 ]]
