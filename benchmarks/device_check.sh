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
# earlier one fails; the exit status is 1 if any failed, and summary.txt says which.
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

step() {  # step NAME COMMAND...: run it, log to $out/NAME.log, remember a failure
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$out/summary.txt"
  if "$@" > "$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  else
    echo "   FAILED (exit $?) in $((SECONDS - start)) s, see $name.log" | tee -a "$out/summary.txt"
    failed+=("$name")
  fi
}

"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" > "$out/device.txt" 2>&1
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

step cuda_tests "$python" -m pytest -q tests/test_cuda.py tests/test_precision.py \
  "tests/test_compile.py::test_the_compiled_encoder_trains_and_evaluates_as_the_eager_one[cuda]"
step throughput "$python" benchmarks/throughput.py --device "$device" "${batches[@]}" \
  --out "$out/throughput.jsonl"
step throughput_compiled "${compile_env[@]}" "$python" benchmarks/throughput.py --device "$device" \
  "${batches[@]}" --compile encoder --out "$out/throughput.jsonl"
config="$PWD/configs/sinwave.yaml"
fit_in_out() { (cd "$out" && "$python" -m titans_lightning.cli fit --config "$config" \
  --trainer.max_epochs 1 --trainer.enable_progress_bar false "${fit[@]}"); }  # logs/ in $out
step fit fit_in_out
find "$out/logs" -name result.json -exec cp {} "$out/fit_result.json" \; 2>/dev/null

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$out/summary.txt"
  exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out/summary.txt"
