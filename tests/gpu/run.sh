#!/usr/bin/env bash
# The GPU check: CUDA-only tests, then Infinity-2B + HEAR figures, on one H100 / H200 in well under 10 minutes.
#
#   bash tests/gpu/run.sh      # from anywhere; JSON lines in $OUT/gpu.jsonl (default out/gpu/), full log in gpu.log
#
# Every step has its own timeout and appends {"step", "rc", "seconds"} to gpu.jsonl (bench.py appends its own result
# lines there too); a failed step does not stop the next. No step starts once GPU_BUDGET_S (default 540) seconds
# are spent. Random weights at the official sizes throughout, so no checkpoint or download is needed.
#
# Estimated seconds on an H100 (not yet measured: this script has not run on a GPU so far):
#   cuda_tests            150  tests/gpu/test_cuda.py: FlexAttention mask == SDPA mask, bf16 vs the official fp32
#                              fixtures, compiled training step and compiled sampling blocks == eager (mostly compile)
#   train_256              60  2B + HEAR adapters, 0.06M schedule (256 px, L 521), 10256 face tokens, batch 32,
#                              grad checkpointing, eager (FlexAttention compiled): tokens/s, MFU, peak memory
#   train_1024             60  the same at 1M (1024 px, L 10521), batch 4 (estimated ~60 GB: fits an 80 GB H100)
#   sample_1024            45  batch 1, CFG 3, KV cache: T5-XL-sized text encoder, generation, d32 VAE decoding
#   sample_1024_compiled  150  the same with every block and the VAE compiled (compilation runs in the warm-up)
set -u
cd "$(dirname "$0")/../.." || exit 1
dir=${OUT:-out/gpu}
mkdir -p "$dir"
results=$dir/gpu.jsonl
log=$dir/gpu.log
budget=${GPU_BUDGET_S:-540}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step() {  # step NAME TIMEOUT_S COMMAND...: run under its own timeout (cut to what is left of the budget), record it
    local name=$1 limit=$2 left=$((budget - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < limit)); then limit=$left; fi
    if ((limit < 30)); then
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"budget of $budget s spent\"}" >>"$results"
        return
    fi
    echo "=== $name (timeout $limit s): $*" >>"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"timeout_s\": $limit}" >>"$results"
    echo "$name: rc $rc in $((SECONDS - start)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --oneline; } >>"$log" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$log" 2>&1
bench=(python bench.py --preset=infinity_2b --device=cuda --out="$results")
step cuda_tests 240 python -m pytest tests/gpu -q -rs -s
step train_256 150 "${bench[@]}" --what=train --pn=0.06M --batch_size=32 --warmup=2 --iters=3
step train_1024 180 "${bench[@]}" --what=train --pn=1M --batch_size=4 --warmup=2 --iters=3
step sample_1024 120 "${bench[@]}" --what=sample --pn=1M --batch_size=1 --t5_layers=24 --warmup=1 --iters=3
step sample_1024_compiled 240 "${bench[@]}" --what=sample --pn=1M --batch_size=1 --t5_layers=24 --warmup=2 \
    --iters=3 --compile=True
echo "done in $SECONDS s: $results" | tee -a "$log"
