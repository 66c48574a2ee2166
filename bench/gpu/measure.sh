#!/usr/bin/env bash
# A GPU session's measurements (bench/gpu/README.md), run through bench/gpu/device.sh:
#   bash bench/gpu/device.sh bash bench/gpu/measure.sh BUDGET [STEP ...]
# Runs the STEPs (default: serve serve-multi tests serve-8workers, most wanted first) in order, each for at most its
# own limit and what is left of BUDGET seconds (default 420). Results land in $OUT (./gpu-results where OUT is
# unset): every step's log in measure.log and each benchmark's JSON (a call brings back 8 files at most). Each step's
# last lines are printed (a call's reply shows the last 12,000 characters).
set -uo pipefail
budget=${1:-420}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(serve serve-multi tests serve-8workers)
out=${OUT:-gpu-results}
mkdir -p "$out"
start=$SECONDS

run() {  # run NAME LIMIT COMMAND...: COMMAND for at most LIMIT seconds and what is left, logged to measure.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    local allowed=$((left < limit ? left : limit))
    if [ "$allowed" -lt 30 ]; then
        echo "== $name: skipped, ${left}s left" | tee -a "$out/measure.log"
        return
    fi
    echo "== $name (at most ${allowed}s): $*" | tee -a "$out/measure.log"
    PYTHONUNBUFFERED=1 timeout -k 10 "$allowed" "$@" > "$out/step.log" 2>&1
    local status=$?
    cat "$out/step.log" >> "$out/measure.log"
    grep -v -E '^\s*$' "$out/step.log" | tail -15
    rm "$out/step.log"
    echo "== $name: exit $status, $((SECONDS - start))s since the start" | tee -a "$out/measure.log"
    for result in bench/results/*.json; do  # the benchmark's JSON result
        [ -e "$result" ] && mv "$result" "$out/$name.json"
    done
    return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import onnxruntime as ort, torch
print("onnxruntime", ort.__version__, ort.get_available_providers(), "torch", torch.__version__,
      "cuda", torch.cuda.is_available())'
for step in "${steps[@]}"; do
    case $step in
        # issue 5's goals: the limit, c1/c8/c32 and `mlflow models serve`, served by 4 workers
        serve) run serve 300 python3 bench/serve.py --device cuda --quick --workers 4 ;;
        # the CUDA paths of the tests, and the serving suites on a GPU machine
        tests) run tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/serving/runtime/test_predictors.py \
                   tests/e2e/scoring tests/e2e/rollout ;;
        # HTTP's per-request cost shared by 8 images (32 in flight in 4 requests)
        serve-multi) run serve-multi 200 python3 bench/serve.py --device cuda --quick --skip-mlflow --skip-overhead \
                         --workers 4 --images-per-request 8 ;;
        # with one image per request, each worker's event loop caps its rate: more of them (16 cores)
        serve-8workers) run serve-8workers 200 python3 bench/serve.py --device cuda --quick --skip-mlflow \
                            --skip-overhead --workers 8 ;;
        serve-1worker) run serve-1worker 200 python3 bench/serve.py --device cuda --quick --skip-mlflow ;;
        explain) run explain 200 python3 bench/explain.py --device cuda --quick ;;
        # issue 33: a detector served over HTTP against its in-process limit (ONNX Runtime and torch on CUDA), and
        # the detection tests' CUDA paths
        detection) run detection 300 python3 bench/detection.py --device cuda --sections serving --seconds 10 ;;
        detection-tests) run detection-tests 300 python3 -m pytest -q -p no:cacheprovider tests/e2e/detection \
                             tests/registry/test_register_detectors.py ;;
        *) echo "unknown step $step (serve, serve-multi, tests, serve-8workers, serve-1worker, explain, detection," \
                "detection-tests)" ;;
    esac
done
