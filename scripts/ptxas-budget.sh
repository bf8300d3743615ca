#!/usr/bin/env bash
# The register and spill budget of the CUDA kernels (issue 23): compiles src/cuda/cuda.cu for one
# architecture (default sm_90) with ptxas -v, prints registers, stack and spills per kernel, and
# fails if any forward or sample-gradient kernel of f32, bf16 or f16 spills (spill stores or
# loads above 0 bytes, or a stack frame, which is where spills go), or if it finds none of them
# (a rename must not turn the check into one of nothing). f64 and the grad_value kernels are
# printed, not held to it: f64 is not the fast path, and the others are not register-bound.
# Needs nvcc (PATH, $CUDACXX or /usr/local/cuda/bin) and c++filt; without nvcc it says so and
# exits 0, like the build, which leaves the cuda backend out where there is no nvcc.
#
#   scripts/ptxas-budget.sh            PTXAS_ARCH=80 scripts/ptxas-budget.sh
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${CUDACXX:-$(command -v nvcc || true)}
[[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
if [[ -z $nvcc ]]; then
  echo "ptxas-budget: skipped: no nvcc (the build has no cuda backend either)"
  exit 0
fi
command -v c++filt >/dev/null || { echo "ptxas-budget: c++filt not found (binutils)" >&2; exit 1; }
arch=${PTXAS_ARCH:-90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

started=$SECONDS
# The flags of the library's own CUDA build that change code generation (CMakeLists.txt: C++17,
# -O3); no -lineinfo or -G, which change register allocation.
"$nvcc" -std=c++17 -O3 -arch="sm_$arch" -cubin -Xptxas -v -Iinclude -Isrc src/cuda/cuda.cu \
  -o "$work/cuda.cubin" >"$work/ptxas.log" 2>&1 || { cat "$work/ptxas.log" >&2; exit 1; }

python3 - "$work/ptxas.log" "$arch" <<'PY'
import re, subprocess, sys

log, arch = open(sys.argv[1]).read().splitlines(), sys.argv[2]
# Per entry: "Compiling entry function 'X'", then "Function properties for X" and its stack and
# spill line, then "Used N registers". A device function ptxas did not inline has a "Function
# properties for Y" block of its own: stack and spills go to the function the block names.
kernels, by_name, entry, properties = [], {}, None, None
for line in log:
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        entry = {"mangled": m.group(1)}
        kernels.append(entry)
        by_name[m.group(1)] = entry
        continue
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        properties = by_name.get(m.group(1))
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and properties is not None:
        properties["stack"], properties["stores"], properties["loads"] = map(int, m.groups())
        properties = None
    m = re.search(r"Used (\d+) registers", line)
    if m and entry is not None:
        entry["registers"] = int(m.group(1))

names = subprocess.run(["c++filt"], input="\n".join(k["mangled"] for k in kernels), capture_output=True,
                       text=True, check=True).stdout.splitlines()
BUDGETED = ("forward_kernel", "sample_gradients_kernel")
DTYPES = {"float": "f32", "__nv_bfloat16": "bf16", "__half": "f16", "double": "f64"}
rows, failures, budgeted = [], [], 0
for k, name in zip(kernels, names):
    m = re.search(r"::(\w+_kernel)<([\w:]+)[,>]", name)
    if not m or "msda::cuda" not in name:
        continue
    kind, dtype = m.group(1), DTYPES.get(m.group(2), m.group(2))
    held = kind in BUDGETED and dtype in ("f32", "bf16", "f16")
    budgeted += held
    args = name[name.index("<") + 1:name.index(">(")] if ">(" in name else ""
    spills = k.get("stores", 0) + k.get("loads", 0)
    # No properties line read for a held kernel: ptxas's output changed, and nothing was checked.
    bad = held and ("stack" not in k or spills > 0 or k["stack"] > 0)
    rows.append((kind, args, k.get("registers", -1), k.get("stack", 0), k.get("stores", 0), k.get("loads", 0),
                 "FAIL" if bad else ("ok" if held else "-")))
    if bad:
        failures.append(f"{kind}<{args}>")

print(f"ptxas -v, sm_{arch}: {len(rows)} msda kernels ({budgeted} held to the budget: no spills, no stack)")
print(f"{'kernel':<26} {'template arguments':<44} {'regs':>4} {'stack':>5} {'st':>4} {'ld':>4}  budget")
for r in sorted(rows):
    print(f"{r[0]:<26} {r[1][:44]:<44} {r[2]:>4} {r[3]:>5} {r[4]:>4} {r[5]:>4}  {r[6]}")
if budgeted == 0:
    sys.exit("ptxas-budget: found no forward or sample-gradient kernel of f32/bf16/f16: were they renamed? "
             "(the check would hold nothing)")
if failures:
    sys.exit("ptxas-budget: over budget (spills or a stack frame): " + ", ".join(failures))
print("ptxas-budget: every forward and sample-gradient kernel of f32, bf16 and f16 fits its registers")
PY
echo "ptxas-budget: $((SECONDS - started)) s"
