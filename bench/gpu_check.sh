#!/usr/bin/env bash
# The device check of issue #22, prepared for a GPU machine (one H100/H200, ~16 cores, no network), run as two device
# calls of a few minutes each (README.md, section GPU, has both calls with the files each carries):
#
#   .venv/bin/python bench/gpu_carry.py                  (first, on the CPU machine after `make`: writes .gpu-carry/)
#   bash bench/gpu_check.sh --steps build,ops,bench      (device call 1)
#   bash bench/gpu_check.sh --steps convert              (device call 2, at once, while call 1's machine is warm)
#
#   0. carry, every call: the patched tree from .gpu-carry/llama.cpp.tar.xz where vendor/llama.cpp is missing (taken
#      only if made from this checkout's patches: scripts/vendor_llama_cpp.py --offline); the model parts of
#      .gpu-carry/a and b kept in $GPU_CHECK_WORK/parts (call 1 brings one, call 2 the other) and, once both are there,
#      models/SmolLM2-135M-Instruct.Q4_1.gguf put together and its sha256 checked
#   1. machine: GPU, driver, nvcc, cores
#   2. build: `make cuda` (GGML_CUDA=ON, this GPU's architecture, flash attention off) of llama-bench,
#      llama-perplexity and test-backend-ops, cuBLAS from CUBLAS_ROOT, the toolkit or a CUDA torch's nvidia-cublas
#      wheel (so make never runs pip); the build time is recorded
#   3. ops: test-backend-ops -b CUDA0 against the CPU backend: MUL_MAT and GET_ROWS on every NQ1 case (batch 1..9, 16,
#      512; rank 32; d_in 576; 4096 x 11008; ggml_patches/0007) and NQ1_LOWRANK (the fused layer, every scale subset);
#      then `perf` of NQ1_LOWRANK fused and with GGML_CUDA_DISABLE_FUSION=1
#   4. bench: llama-bench -ngl 99 -fa 0 -p 512 -n 128, NQ-1.0 against Q4_0: synthetic 1B and 7B shapes written by
#      bench/gpu_models.py, and SmolLM2-135M where its files are here (bench/decode.py makes them on the CPU machine);
#      NQ-1.0's tg128 again with fusion off
#   5. convert: SmolLM2 at 1.0 bpw, --preset fast --device cuda, calibrated on .gpu-carry/b/chat-fast.jsonl (the
#      conversations --calib-chat auto makes through nanoquant._core, which this machine lacks), timed, its stage lines
#      with their peak GPU memory kept; the file's PPL by build-cuda's llama-perplexity (150 chunks of 512 tokens of
#      wiki.test.raw, -ngl 99, then -ngl 0 on the CPU where time is left), next to the CPU fast-preset row and the F32
#      teacher of bench/results/quality-SmolLM2-135M-Instruct.json
#   6. report, every call: bench/results/gpu/gpu_check.json and gpu_check.md with the steps of every call since the
#      last build step (kept in $GPU_CHECK_WORK, which a warm machine keeps between calls), their times, every number
#      and the issue's targets; both and the logs (gpu_check-logs.tar.gz) copied to $OUT where the device tool sets it
#
# Every step prints its progress and runs under what is left of this call's budget; a failed or skipped step is
# recorded with its reason and the rest still run where they can. Needs nvcc (CUDA 12.8+), cmake, ninja, python3 with
# numpy, and for the conversion torch, transformers, tokenizers, safetensors and pyyaml; gguf-py comes from the tree.
#
# Knobs: GPU_CHECK_BUDGET_S (600, this call's), GPU_CHECK_WORK (/tmp/nanoquant-gpu-check: parts, models, logs, steps),
# CUDA_ARCH (from nvidia-smi, else 90), JOBS (nproc), CUBLAS_ROOT, GPU_CHECK_SHAPES ("synthetic-1b synthetic-7b"),
# GPU_CHECK_REPS (3), GPU_CHECK_CARRY (.gpu-carry), GPU_CHECK_CHAT (.gpu-carry/b/chat-fast.jsonl),
# GPU_CHECK_PPL_CHUNKS (150). To try step 5's plumbing without a GPU: GPU_CHECK_DEVICE=cpu, GPU_CHECK_CONVERT_ARGS
# (more converter options, e.g. tiny step counts), GPU_CHECK_BIN (another build's bin/, e.g. build/bin).
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STEPS="build ops bench convert"
RUN_STEPS=$ALL_STEPS
while (( $# )); do
    case $1 in
        --steps) RUN_STEPS=${2:-}; shift; (( $# )) && shift ;;
        --steps=*) RUN_STEPS=${1#--steps=}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (expected --steps LIST, LIST of ${ALL_STEPS// /,})" >&2; exit 2 ;;
    esac
done
RUN_STEPS=${RUN_STEPS//,/ }
[ -n "${RUN_STEPS// /}" ] || { echo "gpu_check.sh: --steps: no step named (some of ${ALL_STEPS// /,})" >&2; exit 2; }
for s in $RUN_STEPS; do
    [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check.sh: --steps: unknown step '$s' (some of ${ALL_STEPS// /,})" >&2
                                        exit 2; }
done
wants() { [[ " $RUN_STEPS " == *" $1 "* ]]; }

DEVICE_OUT=${OUT:-}  # the device tool's folder: only files under it come back (not to be confused with RESULTS)
BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
WORK=${GPU_CHECK_WORK:-/tmp/nanoquant-gpu-check}
JOBS=${JOBS:-$(nproc)}
SHAPES=${GPU_CHECK_SHAPES:-synthetic-1b synthetic-7b}
REPS=${GPU_CHECK_REPS:-3}
CARRY=${GPU_CHECK_CARRY:-.gpu-carry}
CHAT=${GPU_CHECK_CHAT:-$CARRY/b/chat-fast.jsonl}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PPL_CHUNKS=${GPU_CHECK_PPL_CHUNKS:-150}
TEACHER=models/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_DIR=vendor/llama.cpp
RESULTS=bench/results/gpu
BIN=${GPU_CHECK_BIN:-build-cuda/bin}
STEPS=$WORK/steps.jsonl
CALLS=$WORK/calls.jsonl
START=$(date +%s)
# a check begins with its build step, which drops the records of earlier checks; a call without one adds to the check
# made on this machine (call 2 to call 1)
if wants build; then
    rm -f "$STEPS" "$CALLS" "$WORK"/logs/*
fi
mkdir -p "$RESULTS" "$WORK/models" "$WORK/logs" "$WORK/parts"
touch "$STEPS" "$CALLS"
CALL=$(( $(wc -l < "$CALLS") + 1 ))

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
say() { printf '[gpu_check %4ss] %s\n' "$(elapsed)" "$*"; }

# record STEP STATUS SECONDS DETAIL [LOG]: one JSON line per step for the report
record() {
    python3 -c 'import json, sys; print(json.dumps(dict(step=sys.argv[2], status=sys.argv[3], seconds=int(sys.argv[4]),
                detail=sys.argv[5], log=sys.argv[6] if len(sys.argv) > 6 else "", call=int(sys.argv[1]))))' \
        "$CALL" "$@" >> "$STEPS"
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

say "call $CALL of this check: steps ${RUN_STEPS// /, }; budget $BUDGET_S s"

# ---- 0. carried files ---------------------------------------------------------------------------------------------
if [ ! -f "$LLAMA_DIR/.nanoquant-patches.sha256" ] && [ -f "$CARRY/llama.cpp.tar.xz" ]; then
    say "carry: unpacking $CARRY/llama.cpp.tar.xz into vendor/"
    t0=$(date +%s)
    rm -rf "$LLAMA_DIR" && mkdir -p vendor
    if tar -xJf "$CARRY/llama.cpp.tar.xz" -C vendor; then
        record "carry llama.cpp" ok $(( $(date +%s) - t0 )) "unpacked $CARRY/llama.cpp.tar.xz"
    else
        record "carry llama.cpp" failed $(( $(date +%s) - t0 )) "tar could not unpack $CARRY/llama.cpp.tar.xz"
    fi
fi
# make remakes the tree when its stamp is older than the patches, and this checkout's copies of them are new: the
# vendor script takes the tree without network only if its stamp names these very patches, and then touches it
TREE_OK=0
if [ ! -f "$LLAMA_DIR/.nanoquant-patches.sha256" ]; then
    :
elif python3 scripts/vendor_llama_cpp.py --offline --patches ggml_patches --dest "$LLAMA_DIR" \
        > "$WORK/logs/vendor.log" 2>&1; then
    TREE_OK=1
else  # make would try to download and patch llama.cpp again
    record "carry llama.cpp" failed 0 "$(tail -n 2 "$WORK/logs/vendor.log" | tr '\n' ' ')"
fi
NAME=$(basename "$TEACHER")
for part in "$CARRY"/a/"$NAME".* "$CARRY"/b/"$NAME".*; do
    if [ -f "$part" ] && ! cmp -s "$part" "$WORK/parts/$(basename "$part")"; then
        cp "$part" "$WORK/parts/"
    fi
done
if [ ! -f "$TEACHER" ] && [ -f "$WORK/parts/$NAME.part-a" ] && [ -f "$WORK/parts/$NAME.part-b" ]; then
    say "carry: putting $TEACHER together from its two parts"
    mkdir -p models
    cat "$WORK/parts/$NAME.part-a" "$WORK/parts/$NAME.part-b" > "$TEACHER.partial"
    EXPECTED=$(cut -d' ' -f1 "$WORK/parts/$NAME.sha256" 2>/dev/null)
    ACTUAL=$(sha256sum "$TEACHER.partial" | cut -d' ' -f1)
    if [ -n "$EXPECTED" ] && [ "$EXPECTED" = "$ACTUAL" ]; then
        mv "$TEACHER.partial" "$TEACHER"
        record "carry model" ok 0 "$TEACHER put together, sha256 $ACTUAL as expected"
    else
        rm -f "$TEACHER.partial"
        record "carry model" failed 0 "$TEACHER: the parts give sha256 $ACTUAL, expected ${EXPECTED:-(no $NAME.sha256)}"
    fi
fi

# ---- 1. machine -------------------------------------------------------------------------------------------------
say "machine"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH  # a toolkit installed but not on PATH (make looks nvcc up on PATH too)
fi
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
HAVE_GPU=0
[ -n "$GPU" ] && HAVE_GPU=1

# ---- 2. build -----------------------------------------------------------------------------------------------------
BUILD_OK=0
if ! wants build; then
    # an earlier call built them on this machine (build-cuda is git-ignored: it stays while the machine is warm)
    [ -x "$BIN/test-backend-ops" ] && [ -x "$BIN/llama-bench" ] && BUILD_OK=1
elif [ -z "$NVCC" ]; then
    record build failed 0 "nvcc not found on PATH: make cuda needs a CUDA 12.8+ toolkit"
elif (( !TREE_OK )); then
    record build failed 0 "no llama.cpp tree made from these patches: carry $CARRY/llama.cpp.tar.xz (bench/gpu_carry.py)"
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
    if [ -z "${CUBLAS_ROOT:-}" ]; then
        # without CUBLAS_ROOT, make would pip-install the nvidia-cublas wheel: no network here
        record build failed 0 "no cuBLAS: neither the toolkit nor an nvidia-cublas wheel has include/cublas_v2.h; set CUBLAS_ROOT"
    else
        say "build: make cuda (cuBLAS: $CUBLAS_ROOT), $JOBS jobs"
        if run_step build 200 "$WORK/logs/build.log" make cuda JOBS="$JOBS" CUDA_ARCH="$CUDA_ARCH" \
                CUDA_TOOLS="llama-bench llama-perplexity test-backend-ops" CUBLAS_ROOT="$CUBLAS_ROOT"; then
            BUILD_OK=1
        fi
    fi
fi

# ---- 3. test-backend-ops -------------------------------------------------------------------------------------------
if (( BUILD_OK && !HAVE_GPU )) && { wants ops || wants bench; }; then
    record "GPU steps" skipped 0 "no GPU (nvidia-smi lists none): test-backend-ops and llama-bench not run"
fi
if (( !BUILD_OK )) && { wants ops || wants bench; }; then
    record "test-backend-ops, llama-bench" skipped 0 "no build of them ($BIN)"
fi
if wants ops && (( BUILD_OK && HAVE_GPU )); then
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
if wants bench && (( BUILD_OK )); then
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
NQ_OUT=$WORK/models/smollm2-nq-1.0-$DEVICE.gguf
if wants convert; then
    why=()
    [ "$DEVICE" != cuda ] || (( HAVE_GPU )) || why+=("no GPU (nvidia-smi lists none)")
    [ -f "$TEACHER" ] || why+=("no $TEACHER (put together from .gpu-carry/a and b: call 1 brings a, call 2 b)")
    [ -f "$CHAT" ] || why+=("no $CHAT (bench/gpu_carry.py writes it; without _core the converter cannot make it here)")
    (( TREE_OK )) || why+=("no llama.cpp tree made from these patches (its gguf-py is the converter's gguf)")
    if (( ${#why[@]} )); then
        reasons=$(printf '%s; ' "${why[@]}")
        record "convert --device $DEVICE" skipped 0 "${reasons%; }"
    else
        # gguf-py from the tree; transformers asks the gguf package's version of its metadata, which a source tree
        # lacks (transformers 5.23 then fails on version 'N/A'), so where no gguf is installed a dist-info says it
        PYSITE=$WORK/pysite
        rm -rf "$PYSITE" && mkdir -p "$PYSITE"
        if ! python3 -c 'import importlib.metadata as m; m.version("gguf")' 2>/dev/null; then
            GGUF_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$LLAMA_DIR/gguf-py/pyproject.toml" | head -1)
            mkdir -p "$PYSITE/gguf-$GGUF_VERSION.dist-info"
            printf 'Metadata-Version: 2.1\nName: gguf\nVersion: %s\n' "$GGUF_VERSION" \
                > "$PYSITE/gguf-$GGUF_VERSION.dist-info/METADATA"
        fi
        rm -rf "$NQ_OUT" "$NQ_OUT.work" "$NQ_OUT.partial"
        say "convert: SmolLM2 at 1.0 bpw, --preset fast --device $DEVICE ${GPU_CHECK_CONVERT_ARGS:-}"
        # 60 s stay for llama-perplexity on the GPU (~20 s) and the report
        run_step "convert --device $DEVICE" 60 "$WORK/logs/convert.log" \
            env PYTHONPATH="$PWD/python:$PWD/$LLAMA_DIR/gguf-py:$PYSITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
            TRANSFORMERS_OFFLINE=1 python3 convert/convert-hf-to-nq-gguf.py "$TEACHER" --outfile "$NQ_OUT" \
            --bpw 1.0 --preset fast --device "$DEVICE" --calib-chat "$CHAT" \
            --token-embedding-type Q8_0 --output-tensor-type Q8_0 ${GPU_CHECK_CONVERT_ARGS:-}  # gguf-py writes Q8_0
            # without _core; SmolLM2's tied 576-wide head gets Q8_0 by default anyway
        grep -E "peak RSS|realized bpw" "$WORK/logs/convert.log" | sed 's/^/    /'  # its stages: time and memory
        if [ ! -f "$NQ_OUT" ]; then
            :
        elif [ ! -x "$BIN/llama-perplexity" ]; then
            record "perplexity" skipped 0 "no $BIN/llama-perplexity (call 1's build is not on this machine)"
        else
            say "perplexity of the converted file: $PPL_CHUNKS chunks of 512 tokens, -ngl 99, then -ngl 0"
            run_step "perplexity -ngl 99" 10 "$WORK/logs/ppl-gpu.log" "$BIN/llama-perplexity" -m "$NQ_OUT" \
                -f data/wikitext-2-raw/wiki.test.raw -c 512 --chunks "$PPL_CHUNKS" -ngl 99
            # the same file through ggml-cpu: the conversion's quality apart from the CUDA kernels' arithmetic
            run_step "perplexity -ngl 0" 10 "$WORK/logs/ppl-cpu.log" "$BIN/llama-perplexity" -m "$NQ_OUT" \
                -f data/wikitext-2-raw/wiki.test.raw -c 512 --chunks "$PPL_CHUNKS" -ngl 0 -t "$(nproc)"
        fi
    fi
fi
python3 -c 'import json, sys; print(json.dumps(dict(call=int(sys.argv[1]), steps=sys.argv[2].split(),
            seconds=int(sys.argv[3]), budget_s=int(sys.argv[4]))))' "$CALL" "$RUN_STEPS" "$(elapsed)" "$BUDGET_S" \
    >> "$CALLS"

# ---- 6. report ------------------------------------------------------------------------------------------------------
say "report: $RESULTS/gpu_check.json, $RESULTS/gpu_check.md"
python3 - "$WORK" "$RESULTS" "$PPL_CHUNKS" "$DEVICE" <<'EOF'
import json, re, sys
from pathlib import Path

work, out, ppl_chunks, device = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
calls = [json.loads(line) for line in (work / "calls.jsonl").read_text().splitlines() if line.strip()]
machine = json.loads((work / "machine.json").read_text())
logs = work / "logs"

def text_of(path):
    return path.read_text(errors="replace") if path.is_file() else ""

def bench_rows(path):
    text = text_of(path)
    try:
        rows = json.loads(text[text.index("["): text.rindex("]") + 1])
    except ValueError:
        return []
    return rows

def test_counts(path):
    cases = [l for l in text_of(path).splitlines() if re.match(r"\s+\S+\(.*\): ", l)]
    return dict(ok=sum("OK" in l for l in cases), failed=[l.strip() for l in cases if "FAIL" in l][:20],
                not_supported=sum("not supported" in l for l in cases))

tests = {name: test_counts(logs / f"test-backend-ops-{name}.log") for name in ("MUL_MAT", "GET_ROWS", "NQ1_LOWRANK")}
perf = {kind: [l.strip() for l in text_of(logs / f"perf-{kind}.log").splitlines() if "NQ1_LOWRANK(" in l]
        for kind in ("fused", "unfused")}

models = {}
for path in sorted(logs.glob("bench-*.json")):
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

for name, m in models.items():
    m["tg128 NQ/Q4_0"], m["pp512 NQ/Q4_0"] = ratio(m, "tg128"), ratio(m, "pp512")

# step 5: the conversion on this machine next to the CPU's fast-preset row (bench/quality.py's protocol: 150 chunks)
def final_ppl(path):
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", text_of(path))
    return float(match.group(1)) if match else None

quality = json.loads(Path("bench/results/quality-SmolLM2-135M-Instruct.json").read_text())
rows = {r["method"]: r for r in quality}
cpu, f32 = rows.get("NQ 1.0 (fast preset)", {}), rows.get("F32", {})
convert_log = text_of(logs / "convert.log")
step = next((s for s in reversed(steps) if s["step"] == f"convert --device {device}"), None)  # the latest
wrote = re.search(r"wrote .* in (\d+) s, peak RSS (\d+) MiB", convert_log)
bpw = re.search(r"realized bpw ([0-9.]+)", convert_log)
ppl_gpu, ppl_cpu = final_ppl(logs / "ppl-gpu.log"), final_ppl(logs / "ppl-cpu.log")
f32_ppl = f32.get("ppl")
conversion = dict(
    status=step["status"] if step else "not run", detail=step["detail"] if step else "",
    device=device, step_s=step["seconds"] if step else None,
    converter_s=int(wrote.group(1)) if wrote else None, peak_rss_mib=int(wrote.group(2)) if wrote else None,
    realized_bpw=float(bpw.group(1)) if bpw else None,
    stages=[l.strip() for l in convert_log.splitlines() if "peak RSS" in l and not l.startswith("wrote")],
    ppl_chunks=ppl_chunks, ppl_ngl99=ppl_gpu, ppl_ngl0=ppl_cpu, f32_ppl=f32_ppl,
    ppl_ratio_to_f32=round(ppl_gpu / f32_ppl, 2) if ppl_gpu and f32_ppl else None,
    cpu_fast_preset=dict(ppl=cpu.get("ppl"), convert_s=cpu.get("convert_s"), machine=cpu.get("machine"),
                         ppl_ratio_to_f32=round(cpu["ppl"] / f32_ppl, 2) if cpu.get("ppl") and f32_ppl else None,
                         protocol=cpu.get("protocol")),
)
if conversion["converter_s"] and cpu.get("convert_s"):
    conversion["speedup_vs_cpu"] = round(cpu["convert_s"] / conversion["converter_s"], 1)

targets = []
seven = models.get("synthetic-7b", {})
targets.append(dict(target="test-backend-ops passes every NQ1 case",
                    met=all(t["ok"] > 0 and not t["failed"] for t in tests.values())))
targets.append(dict(target="NQ-1.0 tg128 >= 1.3x Q4_0 on the 7B shape (moonshot 2x)", value=seven.get("tg128 NQ/Q4_0"),
                    met=(seven.get("tg128 NQ/Q4_0") or 0) >= 1.3))
targets.append(dict(target="NQ-1.0 pp512 >= 0.8x Q4_0 on the 7B shape", value=seven.get("pp512 NQ/Q4_0"),
                    met=(seven.get("pp512 NQ/Q4_0") or 0) >= 0.8))
build = next((s for s in steps if s["step"] == "build"), {})
report = dict(machine=machine, calls=calls, build_s=build.get("seconds"), steps=steps, test_backend_ops=tests,
              perf_nq1_lowrank=perf, llama_bench=models, conversion=conversion, targets=targets)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

md = [f"# GPU check ({machine['gpu']}, {machine['cores']} cores, commit {machine['commit']})", "",
      "bench/gpu_check.sh, " + "; ".join(f"call {c['call']} ({', '.join(c['steps'])}): {c['seconds']} s of "
                                          f"{c['budget_s']}" for c in calls)
      + f"; `make cuda` {build.get('seconds')} s (CUDA_ARCH {machine['cuda_arch']}, {machine['nvcc']}).", "",
      "| call | step | status | s | detail |", "|---:|---|---|---:|---|"]
md += [f"| {s.get('call', '')} | {s['step']} | {s['status']} | {s['seconds']} | {s['detail'][:160]} |" for s in steps]
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
c, base = conversion, conversion["cpu_fast_preset"]
cell = lambda value, unit="": "" if value is None else f"{value}{unit}"  # noqa: E731
md += ["", f"SmolLM2-135M at 1.0 bpw, `--preset fast`: converted here with `--device {device}` "
       f"({c['status']}), PPL over {ppl_chunks} chunks of 512 tokens of wiki.test.raw; the CPU row is "
       "bench/results/quality-SmolLM2-135M-Instruct.json's (150 chunks, scored on the CPU):", "",
       "| conversion | convert s | realized bpw | PPL | PPL / F32 | PPL scored on the CPU |", "|---|---:|---:|---:|---:|---:|",
       f"| `--device {device}`, this machine | {cell(c['converter_s'])} | {cell(c['realized_bpw'])} | "
       f"{cell(c['ppl_ngl99'], ' (-ngl 99)')} | {cell(c['ppl_ratio_to_f32'])} | {cell(c['ppl_ngl0'], ' (-ngl 0)')} |",
       f"| CPU, {base['machine']} | {base['convert_s']} | | {base['ppl']} | {base['ppl_ratio_to_f32']} | {base['ppl']} |",
       f"| F32 teacher | | | {c['f32_ppl']} | 1.0 | |"]
if c.get("speedup_vs_cpu"):
    md += ["", f"Conversion {c['speedup_vs_cpu']}x faster than the CPU row (its own total, `wrote ... in N s`)."]
if c["stages"]:
    md += ["", "Its stages (peak GPU memory is torch's allocations):", "", "```"] + c["stages"] + ["```"]
md += ["", "| target | value | met |", "|---|---:|---|"]
md += [f"| {t['target']} | {'' if t.get('value') is None else t['value']} | {'yes' if t['met'] else 'no'} |"
       for t in targets]
if perf["fused"] or perf["unfused"]:
    md += ["", "test-backend-ops perf NQ1_LOWRANK (fused, then GGML_CUDA_DISABLE_FUSION=1):", "", "```"]
    md += perf["fused"] + [""] + perf["unfused"] + ["```"]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
if [ -n "$DEVICE_OUT" ] && [ -d "$DEVICE_OUT" ]; then
    # what comes back from the device tool: the report and every log of the check (llama-bench's JSON among them)
    cp "$RESULTS/gpu_check.json" "$RESULTS/gpu_check.md" "$DEVICE_OUT/"
    tar -czf "$DEVICE_OUT/gpu_check-logs.tar.gz" -C "$WORK" logs steps.jsonl calls.jsonl machine.json 2>/dev/null
    say "copied the report and gpu_check-logs.tar.gz to $DEVICE_OUT"
fi
say "done in $(elapsed) s"
