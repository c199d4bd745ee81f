#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests (the compiled encoder's agreement with the eager
# one among them), then benchmarks/throughput.py on the device, eager and with the encoder layers
# compiled (--compile encoder; both runs append to throughput.jsonl), then a one-epoch sinwave
# fit; everything lands in one folder (default device_check/<time>/).
#
#   bash benchmarks/device_check.sh [--out DIR] [--shrink]
#
# --shrink runs the same steps on the CPU in a minute or two (1 timed batch, a tiny fit, and
# torch.compile switched off by TORCH_COMPILE_DISABLE=1: tests/test_compile.py checks inductor
# on the CPU), to check the script itself where there is no GPU. Every step runs even if an
# earlier one fails; the exit status is 1 if any failed, and summary.txt says which. Each step
# has its share of an 8-minute budget (timeout; a step over it fails as timed out), so the whole
# check ends within 8 minutes whatever hangs.
set -u
cd "$(dirname "$0")/.."
out="device_check/$(date -u +%Y%m%dT%H%M%SZ)"
shrink=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --shrink) shrink=1; shift ;;
    *) echo "device_check.sh: unknown argument $1 (use --out DIR, --shrink)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python}
failed=()

step() {  # step NAME SECONDS COMMAND...: run it, log to $out/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status=0
  echo "== $name (at most $limit s): $*" | tee -a "$out/summary.txt"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1 || status=$?
  if [ "$status" = 0 ]; then
    echo "   ok in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  elif [ "$status" = 124 ] || { [ "$status" = 137 ] && [ $((SECONDS - start)) -ge "$limit" ]; }; then
    echo "   FAILED: timed out after $limit s, see $name.log" | tee -a "$out/summary.txt"
    failed+=("$name")
  else
    echo "   FAILED (exit $status) in $((SECONDS - start)) s, see $name.log" | tee -a "$out/summary.txt"
    failed+=("$name")
  fi
}

timeout --kill-after=5 25 "$python" -c "import torch; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  > "$out/device.txt" 2>&1
if [ "$shrink" = 1 ]; then
  device=cpu; batches=(--batches 1 --warmup 0 --threads 1)
  fit=(--model.dim_feedforward 32 --trainer.limit_train_batches 2 --trainer.limit_val_batches 2
       --trainer.limit_test_batches 2 --trainer.accelerator cpu)
  compile_env=(env TORCH_COMPILE_DISABLE=1)
else
  device=cuda; batches=(--batches 7 --warmup 2)
  fit=(--trainer.accelerator gpu --trainer.devices 1)
  compile_env=(env)
fi

# the budget: 30 s for the device line above, then 125 + 80 + 125 + 80 s, each with up to 10 s
# more to stop a step that overran: 8 minutes
step cuda_tests 125 "$python" -m pytest -q tests/test_cuda.py tests/test_precision.py \
  "tests/test_compile.py::test_the_compiled_encoder_trains_and_evaluates_as_the_eager_one[cuda]"
step throughput 80 "$python" benchmarks/throughput.py --device "$device" "${batches[@]}" \
  --out "$out/throughput.jsonl"
step throughput_compiled 125 "${compile_env[@]}" "$python" benchmarks/throughput.py \
  --device "$device" "${batches[@]}" --compile encoder --out "$out/throughput.jsonl"
step fit 80 sh -c 'cd "$1" && shift && exec "$@"' in_out "$out" "$python" -m titans_lightning.cli fit \
  --config "$PWD/configs/sinwave.yaml" --trainer.max_epochs 1 \
  --trainer.enable_progress_bar false "${fit[@]}"  # its logs/ in $out
find "$out/logs" -name result.json -exec cp {} "$out/fit_result.json" \; 2>/dev/null

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$out/summary.txt"
  exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out/summary.txt"
