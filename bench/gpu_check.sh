#!/usr/bin/env bash
# The device check of issue #22, prepared to run once on a GPU machine (one H100/H200, ~16 cores) in <= 10 minutes:
#
#   bash bench/gpu_check.sh        (from the repository root; environment knobs below)
#
#   1. machine: GPU, driver, nvcc, cores
#   2. build: `make cuda` (GGML_CUDA=ON, this GPU's architecture, flash attention off), llama-bench and
#      test-backend-ops only; the build time is recorded
#   3. test-backend-ops -b CUDA0 against the CPU backend: MUL_MAT and GET_ROWS on every NQ1 case (batch 1..9, 16, 512;
#      rank 32; d_in 576; 4096 x 11008; ggml_patches/0007) and NQ1_LOWRANK (the fused layer, every scale subset);
#      then `perf` of NQ1_LOWRANK fused and with GGML_CUDA_DISABLE_FUSION=1
#   4. llama-bench -ngl 99 -fa 0 -p 512 -n 128, NQ-1.0 against Q4_0: synthetic 1B and 7B shapes written by
#      bench/gpu_models.py, and SmolLM2-135M where its files are here (bench/decode.py makes them on the CPU machine);
#      NQ-1.0's tg128 again with fusion off
#   5. a short `--device cuda` conversion of SmolLM2: skipped with a message while the converter has no --device
#   6. bench/results/gpu/gpu_check.json and gpu_check.md (the steps, their times, every number, the issue's targets)
#
# Every step prints its progress and runs under what is left of the budget; a failed step is recorded and the rest
# still run where they can. Needs: nvcc (CUDA 12.8+), cmake, ninja, python3 with numpy, and either the patched tree
# (vendor/llama.cpp, made by `make` on the CPU machine) or downloads/llama_cpp_python-0.3.36.tar.gz. cuBLAS comes from
# CUBLAS_ROOT, else the CUDA toolkit's own, else an installed nvidia-cublas wheel (a CUDA torch brings one), else
# `make` installs the nvidia-cublas wheel into .venv (needs PyPI).
#
# Knobs: GPU_CHECK_BUDGET_S (600), GPU_CHECK_WORK (/tmp/nanoquant-gpu-check: models and logs), CUDA_ARCH (from
# nvidia-smi, else 90), JOBS (nproc), CUBLAS_ROOT, GPU_CHECK_SHAPES ("synthetic-1b synthetic-7b"), GPU_CHECK_REPS (3).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
WORK=${GPU_CHECK_WORK:-/tmp/nanoquant-gpu-check}
JOBS=${JOBS:-$(nproc)}
SHAPES=${GPU_CHECK_SHAPES:-synthetic-1b synthetic-7b}
REPS=${GPU_CHECK_REPS:-3}
OUT=bench/results/gpu
BIN=build-cuda/bin
STEPS=$WORK/steps.jsonl
START=$(date +%s)
mkdir -p "$OUT" "$WORK/models" "$WORK/logs"
: > "$STEPS"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
say() { printf '[gpu_check %4ss] %s\n' "$(elapsed)" "$*"; }

# record STEP STATUS SECONDS DETAIL [LOG]: one JSON line per step for the report
record() {
    python3 -c 'import json, sys; print(json.dumps(dict(step=sys.argv[1], status=sys.argv[2], seconds=int(sys.argv[3]),
                detail=sys.argv[4], log=sys.argv[5] if len(sys.argv) > 5 else "")))' "$@" >> "$STEPS"
    say "$1: $2 ($3 s) $4"
}

# run_step STEP RESERVE_S LOG COMMAND...: runs COMMAND with what is left of the budget minus RESERVE_S
run_step() {
    local step=$1 reserve=$2 log=$3; shift 3
    local limit=$(( $(left) - reserve ))
    if (( limit < 10 )); then
        record "$step" skipped 0 "out of time (budget ${BUDGET_S} s)"
        return 1
    fi
    local t0=$(date +%s) rc
    timeout "$limit" "$@" > "$log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        record "$step" ok "$secs" "" "$log"
    elif (( rc == 124 )); then
        record "$step" timeout "$secs" "stopped after ${limit} s; $(tail -n 3 "$log" | tr '\n' ' ')" "$log"
    else
        record "$step" failed "$secs" "exit $rc; $(tail -n 5 "$log" | tr '\n' ' ')" "$log"
    fi
    return $rc
}

# ---- 1. machine -------------------------------------------------------------------------------------------------
say "machine"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)
NVCC=$(command -v nvcc || true)
NVCC_VERSION=$([ -n "$NVCC" ] && nvcc --version | tail -n 2 | head -n 1)
if [ -z "${CUDA_ARCH:-}" ]; then
    CAP=$(echo "$GPU" | awk -F', ' '{print $4}' | tr -d '.')
    CUDA_ARCH=${CAP:-90}
fi
python3 -c 'import json, sys; print(json.dumps(dict(gpu=sys.argv[1], nvcc=sys.argv[2], cores=int(sys.argv[3]),
            cuda_arch=sys.argv[4], commit=sys.argv[5])))' "${GPU:-none}" "${NVCC_VERSION:-none}" "$(nproc)" \
    "$CUDA_ARCH" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$WORK/machine.json"
say "GPU: ${GPU:-none found}; nvcc: ${NVCC_VERSION:-not found}; $(nproc) cores; CUDA_ARCH=$CUDA_ARCH"

# ---- 2. build -----------------------------------------------------------------------------------------------------
BUILD_OK=0
if [ -z "$NVCC" ]; then
    record build failed 0 "nvcc not found on PATH: make cuda needs a CUDA 12.8+ toolkit"
elif [ ! -f vendor/llama.cpp/.nanoquant-patches.sha256 ] && [ ! -f downloads/llama_cpp_python-0.3.36.tar.gz ]; then
    record build failed 0 "no llama.cpp tree: bring vendor/llama.cpp (made by make) or downloads/llama_cpp_python-0.3.36.tar.gz"
else
    if [ -z "${CUBLAS_ROOT:-}" ]; then
        TOOLKIT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
        if [ -f "$TOOLKIT/include/cublas_v2.h" ]; then
            CUBLAS_ROOT=$TOOLKIT
        else  # a CUDA torch's nvidia-cublas wheel (CUDA 13: nvidia/cu13, CUDA 12: nvidia/cublas)
            CUBLAS_ROOT=$(python3 - <<'EOF' 2>/dev/null
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for sub in ("cu13", "cublas"):
        if (pathlib.Path(root) / sub / "include" / "cublas_v2.h").is_file():
            print(pathlib.Path(root) / sub)
            raise SystemExit
EOF
)
        fi
    fi
    say "build: make cuda (cuBLAS: ${CUBLAS_ROOT:-the nvidia-cublas wheel make installs into .venv}), $JOBS jobs"
    if run_step build 240 "$WORK/logs/build.log" make cuda JOBS="$JOBS" CUDA_ARCH="$CUDA_ARCH" \
            CUDA_TOOLS="llama-bench test-backend-ops" ${CUBLAS_ROOT:+CUBLAS_ROOT="$CUBLAS_ROOT"}; then
        BUILD_OK=1
    fi
fi

# ---- 3. test-backend-ops -------------------------------------------------------------------------------------------
HAVE_GPU=0
[ -n "$GPU" ] && HAVE_GPU=1
if (( BUILD_OK && !HAVE_GPU )); then
    record "GPU steps" skipped 0 "no GPU (nvidia-smi lists none): stopped before the steps that need one"
fi
if (( BUILD_OK && HAVE_GPU )); then
    for spec in "MUL_MAT type_a=nq1" "GET_ROWS type=nq1" "NQ1_LOWRANK"; do
        set -- $spec
        say "test-backend-ops -b CUDA0 -o $1 ${2:+-p $2}"
        run_step "test-backend-ops $1" 200 "$WORK/logs/test-backend-ops-$1.log" \
            "$BIN/test-backend-ops" test -b CUDA0 -o "$1" ${2:+-p "$2"}
    done
    say "test-backend-ops perf NQ1_LOWRANK, fused and op by op"
    run_step "perf NQ1_LOWRANK fused" 180 "$WORK/logs/perf-fused.log" \
        "$BIN/test-backend-ops" perf -b CUDA0 -o NQ1_LOWRANK
    run_step "perf NQ1_LOWRANK unfused" 170 "$WORK/logs/perf-unfused.log" \
        env GGML_CUDA_DISABLE_FUSION=1 "$BIN/test-backend-ops" perf -b CUDA0 -o NQ1_LOWRANK
fi

# ---- 4. llama-bench ------------------------------------------------------------------------------------------------
# bench NAME NQ_FILE Q4_0_FILE: both files, then NQ's tg128 without fusion
bench() {
    local name=$1 nq=$2 q4=$3
    say "llama-bench $name: NQ-1.0 vs Q4_0, pp512 and tg128, $REPS repetitions"
    run_step "llama-bench $name" 60 "$WORK/logs/bench-$name.json" \
        "$BIN/llama-bench" -m "$nq" -m "$q4" -ngl 99 -fa 0 -p 512 -n 128 -r "$REPS" -o json
    run_step "llama-bench $name NQ-1.0 unfused" 50 "$WORK/logs/bench-$name-unfused.json" \
        env GGML_CUDA_DISABLE_FUSION=1 "$BIN/llama-bench" -m "$nq" -ngl 99 -fa 0 -p 0 -n 128 -r "$REPS" -o json
}
if (( BUILD_OK )); then
    for shape in $SHAPES; do
        say "models: $shape (bench/gpu_models.py)"
        if run_step "models $shape" 90 "$WORK/logs/models-$shape.log" \
                python3 bench/gpu_models.py "$WORK/models" --shapes "$shape" && (( HAVE_GPU )); then
            bench "$shape" "$WORK/models/$shape-NQ-1.0.gguf" "$WORK/models/$shape-Q4_0.gguf"
        fi
    done
    SMOL=bench/results/SmolLM2-135M-Instruct
    SMOL_NQ=${SMOLLM2_NQ:-$SMOL/NQ-1.0.gguf}
    SMOL_Q4=${SMOLLM2_Q4_0:-$SMOL/decode-Q4_0.gguf}
    if (( !HAVE_GPU )); then
        :
    elif [ -f "$SMOL_NQ" ] && [ -f "$SMOL_Q4" ]; then
        bench smollm2 "$SMOL_NQ" "$SMOL_Q4"
    else
        record "llama-bench smollm2" skipped 0 "no $SMOL_NQ or $SMOL_Q4 (bench/quality.py and bench/decode.py make them)"
    fi
fi

# ---- 5. conversion on the GPU ---------------------------------------------------------------------------------------
if python3 convert/convert-hf-to-nq-gguf.py --help 2>/dev/null | grep -q -- "--device"; then
    record "convert --device cuda" skipped 0 "the converter has --device now: add its timed run here (issue #22 item 5)"
else
    record "convert --device cuda" skipped 0 "the converter has no --device option yet (issue #22 item 5)"
fi

# ---- 6. report ------------------------------------------------------------------------------------------------------
say "report: $OUT/gpu_check.json, $OUT/gpu_check.md"
python3 - "$WORK" "$OUT" "$BUDGET_S" "$(elapsed)" <<'EOF'
import json, re, sys
from pathlib import Path

work, out, budget, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
machine = json.loads((work / "machine.json").read_text())

def bench_rows(path):
    text = path.read_text() if path.is_file() else ""
    try:
        rows = json.loads(text[text.index("["): text.rindex("]") + 1])
    except ValueError:
        return []
    return rows

def test_counts(path):
    text = path.read_text() if path.is_file() else ""
    cases = [l for l in text.splitlines() if re.match(r"\s+\S+\(.*\): ", l)]
    return dict(ok=sum("OK" in l for l in cases), failed=[l.strip() for l in cases if "FAIL" in l][:20],
                not_supported=sum("not supported" in l for l in cases))

tests = {name: test_counts(work / "logs" / f"test-backend-ops-{name}.log")
         for name in ("MUL_MAT", "GET_ROWS", "NQ1_LOWRANK")}
perf = {}
for kind in ("fused", "unfused"):
    path = work / "logs" / f"perf-{kind}.log"
    perf[kind] = [l.strip() for l in path.read_text().splitlines() if "NQ1_LOWRANK(" in l] if path.is_file() else []

models = {}
for path in sorted((work / "logs").glob("bench-*.json")):
    name = path.name[len("bench-"):-len(".json")]
    unfused = name.endswith("-unfused")
    name = name.removesuffix("-unfused")
    for r in bench_rows(path):
        kind = "NQ-1.0" if "NQ1" in r.get("model_type", "") or "NQ-1.0" in r.get("model_filename", "") else "Q4_0"
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        key = f"{kind} unfused" if unfused else kind
        models.setdefault(name, {}).setdefault(key, {})[test] = round(float(r["avg_ts"]), 2)
        models[name].setdefault("size_mib", {})[key] = round(r["model_size"] / 2**20, 1)

def ratio(m, test):
    try:
        return round(m["NQ-1.0"][test] / m["Q4_0"][test], 3)
    except (KeyError, ZeroDivisionError):
        return None

targets = []
for name, m in models.items():
    m["tg128 NQ/Q4_0"], m["pp512 NQ/Q4_0"] = ratio(m, "tg128"), ratio(m, "pp512")
seven = models.get("synthetic-7b", {})
targets.append(dict(target="test-backend-ops passes every NQ1 case",
                    met=all(t["ok"] > 0 and not t["failed"] for t in tests.values())))
targets.append(dict(target="NQ-1.0 tg128 >= 1.3x Q4_0 on the 7B shape (moonshot 2x)", value=seven.get("tg128 NQ/Q4_0"),
                    met=(seven.get("tg128 NQ/Q4_0") or 0) >= 1.3))
targets.append(dict(target="NQ-1.0 pp512 >= 0.8x Q4_0 on the 7B shape", value=seven.get("pp512 NQ/Q4_0"),
                    met=(seven.get("pp512 NQ/Q4_0") or 0) >= 0.8))
build = next((s for s in steps if s["step"] == "build"), {})
report = dict(machine=machine, budget_s=budget, total_s=total, build_s=build.get("seconds"), steps=steps,
              test_backend_ops=tests, perf_nq1_lowrank=perf, llama_bench=models, targets=targets)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

md = [f"# GPU check ({machine['gpu']}, {machine['cores']} cores, commit {machine['commit']})", "",
      f"bench/gpu_check.sh: {total} s of a {budget} s budget; `make cuda` {build.get('seconds')} s "
      f"(CUDA_ARCH {machine['cuda_arch']}, {machine['nvcc']}).", "", "| step | status | s | detail |", "|---|---|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail'][:160]} |" for s in steps]
md += ["", "| test-backend-ops -b CUDA0 | OK | failed | not supported |", "|---|---:|---:|---:|"]
md += [f"| {n} | {t['ok']} | {len(t['failed'])} | {t['not_supported']} |" for n, t in tests.items()]
md += ["", "llama-bench -ngl 99 -fa 0, tokens/s (mean over the repetitions, llama-bench's avg_ts):", "",
       "| model | file | size MiB | pp512 | tg128 |", "|---|---|---:|---:|---:|"]
for name, m in models.items():
    for kind in ("NQ-1.0", "NQ-1.0 unfused", "Q4_0"):
        if kind in m:
            md.append(f"| {name} | {kind} | {m['size_mib'].get(kind, '')} | {m[kind].get('pp512', '')} | "
                      f"{m[kind].get('tg128', '')} |")
    md.append(f"| {name} | NQ / Q4_0 | | {m['pp512 NQ/Q4_0']} | {m['tg128 NQ/Q4_0']} |")
md += ["", "| target | value | met |", "|---|---:|---|"]
md += [f"| {t['target']} | {t.get('value', '')} | {'yes' if t['met'] else 'no'} |" for t in targets]
if perf["fused"] or perf["unfused"]:
    md += ["", "test-backend-ops perf NQ1_LOWRANK (fused, then GGML_CUDA_DISABLE_FUSION=1):", "", "```"]
    md += perf["fused"] + [""] + perf["unfused"] + ["```"]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
say "done in $(elapsed) s"
