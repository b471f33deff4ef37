#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes including the install, run from the repository's root:
#
#     bash benchmarks/gpu_check.sh                 # on the GPU machine
#     bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps, tiny, on the CPU (to try it first)
#
# Steps, each under its own time box (a step that overruns is stopped and recorded, the rest go on):
#   install   `pip install -e ".[test]"` unless `import trajstore` already works (no network: pip's cache)
#   tests     every test that runs on a device, on cuda (tests/conftest.py's `device` fixture)
#   sampling  benchmarks/bench_sampling.py (CPU and CUDA)
#   interp    benchmarks/bench_interpolation.py (CPU and CUDA)
#   matching  distillation s/iteration and peak GPU memory: CIFAR-shaped random data (3x32x32, 10
#             classes, ipc 10, N = 30) in every memory mode (benchmarks/bench_matching_memory.py)
#   torchrun  one tiny `torchrun -m trajstore experts` + `distill` on the GPU(s) (NCCL), 1 and 2 processes
#             on the CPU (gloo) -- the multi-process path end to end, with its s/iteration
# Everything lands in "$OUT" (default ./gpu-check-out): one JSON per step, logs, and summary.json.
set -u

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; fi
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python}"
BUDGET=470                       # seconds for the whole script, under the 8-minute slot
START=$(date +%s)
: > "$LOG"
: > "$OUT/steps.jsonl"

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run under a time box no longer than what is left of the budget.
step() {
    local name=$1 box=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 15 )); then
        say "skip $name: only ${left}s left of the budget"
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": true, \"seconds\": 0}" >> "$OUT/steps.jsonl"
        return
    fi
    (( box > left - 5 )) && box=$(( left - 5 ))
    say "start $name (time box ${box}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$box" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    say "end $name: rc $rc after ${dt}s$( (( rc == 124 )) && echo ' (time box reached)')"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG" > /dev/null
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"timed_out\": $( (( rc == 124 || rc == 137 )) && echo true || echo false)}" >> "$OUT/steps.jsonl"
}

say "gpu_check in $(pwd), output $OUT, dry run: $DRY"
(command -v nvidia-smi > /dev/null && nvidia-smi) >> "$LOG" 2>&1 || say "no nvidia-smi"

# -- install ------------------------------------------------------------------------------------
# (a bash -c script, not a function: `timeout` runs programs; $0 is the Python)
INSTALL='if "$0" -c "import trajstore, pytest" 2> /dev/null; then
    echo "trajstore and pytest import already: not installing"; exit 0
fi
"$0" -m pip install -e ".[test]" \
    || "$0" -m pip install --no-build-isolation -e ".[test]" \
    || "$0" -m pip install --no-build-isolation --no-deps -e .'
step install 200 bash -c "$INSTALL" "$PY"
if ! "$PY" -c "import trajstore" 2>> "$LOG"; then
    say "trajstore does not import; giving up"; exit 1
fi
"$PY" - >> "$LOG" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF

if (( DRY )); then
    DEVICE=cpu; SELECT="cpu"; NGPU=0
    SAMPLING=(--experts 2 --width 8 --timesteps 11 --max-start-epoch 5 --repeat 3)
    INTERP=(--width 8 --timesteps 11 --repeat 5)
    MATCHING=(--steps 2 --ipc 1 --width 8 --repeat 1 --warmup 0)
else
    DEVICE=cuda; SELECT="cuda"
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>> "$LOG" || echo 0)
    SAMPLING=(--experts 10 --repeat 30)
    INTERP=(--repeat 100)
    MATCHING=(--steps 30 --ipc 10 --repeat 3 --warmup 1)
fi
MODES=$("$PY" -c "from trajstore.distill.matching import MEMORY_MODES; print(','.join(MEMORY_MODES))")
say "memory modes: $MODES; GPUs: $NGPU"

# -- tests on the device --------------------------------------------------------------------------
step tests 120 "$PY" -m pytest -q -x -p no:cacheprovider -k "$SELECT" tests/ --junitxml "$OUT/tests.xml"

# -- sampling and interpolation benchmarks ----------------------------------------------------------
step sampling 60 "$PY" -m benchmarks.bench_sampling "${SAMPLING[@]}" --out "$OUT/sampling.json"
step interpolation 40 "$PY" -m benchmarks.bench_interpolation "${INTERP[@]}" --out "$OUT/interpolation.json"

# -- distillation s/iteration and peak memory, every memory mode --------------------------------------
step matching 150 "$PY" -m benchmarks.bench_matching_memory "${MATCHING[@]}" --modes "$MODES" \
    --device "$DEVICE" --out "$OUT/matching_memory.json"

# -- several processes: torchrun on the GPUs (NCCL) and --nproc on the CPU (gloo) ----------------------
if (( DRY )); then
    step distributed 120 "$PY" -m benchmarks.bench_distributed --nproc 1,2 --device cpu --tiny \
        --out "$OUT/distributed.json"
else
    step distributed 120 "$PY" -m benchmarks.bench_distributed --nproc "1$( (( NGPU > 1 )) && echo ",$NGPU")" \
        --device cuda --torchrun --out "$OUT/distributed.json"
fi

"$PY" - "$OUT" >> "$LOG" 2>&1 <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
summary = {"steps": steps, "results": {}}
for name in ("sampling", "interpolation", "matching_memory", "distributed"):
    path = out / f"{name}.json"
    if path.exists():
        summary["results"][name] = json.loads(path.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("wrote", out / "summary.json")
EOF
say "done in $(( $(date +%s) - START ))s; results in $OUT"
