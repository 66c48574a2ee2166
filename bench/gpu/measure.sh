#!/usr/bin/env bash
# A GPU session's measurements (bench/gpu/README.md), run through bench/gpu/device.sh:
#   bash bench/gpu/device.sh bash bench/gpu/measure.sh BUDGET [STEP ...]
# Runs the STEPs (default: serve tests serve-1worker serve-multi, most wanted first) in order, each for at most its
# own limit and what is left of BUDGET seconds (default 420). Logs and JSON results land in $OUT (./gpu-results
# where OUT is unset); each step's last lines are printed.
set -uo pipefail
budget=${1:-420}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(serve tests serve-1worker serve-multi)
out=${OUT:-gpu-results}
mkdir -p "$out"
start=$SECONDS

run() {  # run NAME LIMIT COMMAND...: COMMAND for at most LIMIT seconds and what is left; output to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    local allowed=$((left < limit ? left : limit))
    if [ "$allowed" -lt 30 ]; then
        echo "== $name: skipped, ${left}s left"
        return
    fi
    echo "== $name (at most ${allowed}s): $*"
    PYTHONUNBUFFERED=1 timeout -k 10 "$allowed" "$@" > "$out/$name.log" 2>&1
    local status=$?
    grep -v -E '^\s*$' "$out/$name.log" | tail -40
    echo "== $name: exit $status, $((SECONDS - start))s since the start"
    for result in bench/results/*.json; do  # the benchmark's JSON result
        [ -e "$result" ] && mv "$result" "$out/$name-$(basename "$result")"
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
        tests) run tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_predictors.py \
                   tests/test_serving.py tests/test_rollout.py ;;
        serve-1worker) run serve-1worker 200 python3 bench/serve.py --device cuda --quick --skip-mlflow ;;
        serve-multi) run serve-multi 200 python3 bench/serve.py --device cuda --quick --skip-mlflow --skip-overhead \
                         --workers 4 --images-per-request 8 ;;
        explain) run explain 200 python3 bench/explain.py --device cuda --quick ;;
        *) echo "unknown step $step (serve, tests, serve-1worker, serve-multi, explain)" ;;
    esac
done
