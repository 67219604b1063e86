#!/usr/bin/env bash
# The GPU check: CUDA-only tests, then Infinity-2B + HEAR figures, on one H100 / H200 in under 10 minutes.
#
#   bash tests/gpu/run.sh    # from anywhere; writes gpu.jsonl, gpu.log, cuda_tests.xml to $OUT if set, else out/gpu/
#
# Every step has its own timeout (cut to what is left of GPU_BUDGET_S, default 540 s; no step starts with under 30 s
# left) and appends {"step", "rc", "seconds", "timeout_s"} to gpu.jsonl, after bench.py's own result lines (tagged with
# the step); a failed or timed-out step does not stop the next. The script ends with a summary table. Random weights
# at the official sizes throughout: no checkpoint, no download, no network.
#
# Estimated seconds on an H100 (not yet measured: this script has not run on a GPU so far):
#   cuda_tests            150  tests/gpu/test_cuda.py: FlexAttention mask == SDPA mask, bf16 vs the official fp32
#                              fixtures, compiled training step and compiled sampling blocks == eager (mostly compile)
#   train_256              60  2B + HEAR adapters, 0.06M schedule (256 px, L 521), 10256 face tokens, batch 32,
#                              grad checkpointing, eager (FlexAttention compiled): tokens/s, MFU, peak memory
#   train_1024             60  the same at 1M (1024 px, L 10521), batch 4 (estimated ~60 GB: fits an 80 GB H100)
#   sample_1024            45  batch 1, CFG 3, KV cache: T5-XL-sized text encoder, generation, d32 VAE decoding
#   sample_1024_compiled  150  the same with every block and the VAE decoder compiled (compilation runs in the warm-up)
set -u
cd "$(dirname "$0")/../.." || exit 1
dir=${OUT:-out/gpu}
mkdir -p "$dir"
results=$dir/gpu.jsonl
log=$dir/gpu.log
budget=${GPU_BUDGET_S:-540}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step() {  # step NAME TIMEOUT_S COMMAND...: run under its own timeout, keep bench.py's JSON lines, record the step
    local name=$1 limit=$2 left=$((budget - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < limit)); then limit=$left; fi
    if ((limit < 30)); then
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"budget of $budget s spent\"}" >>"$results"
        return
    fi
    echo "=== $name (timeout $limit s): $*" >>"$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log" | grep --line-buffered '^{"what"' |
        sed -u "s/^{/{\"step\": \"$name\", /" >>"$results"
    rc=${PIPESTATUS[0]}
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"timeout_s\": $limit}" >>"$results"
    echo "$name: rc $rc in $((SECONDS - start)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --oneline; } >>"$log" 2>&1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$log" 2>&1
bench=($py bench.py --preset=infinity_2b --device=cuda)
step cuda_tests 240 $py -m pytest tests/gpu -q -rs -s --junitxml="$dir/cuda_tests.xml"
step train_256 150 "${bench[@]}" --what=train --pn=0.06M --batch_size=32 --warmup=2 --iters=3
step train_1024 180 "${bench[@]}" --what=train --pn=1M --batch_size=4 --warmup=2 --iters=3
step sample_1024 120 "${bench[@]}" --what=sample --pn=1M --batch_size=1 --t5_layers=24 --warmup=1 --iters=3
step sample_1024_compiled 240 "${bench[@]}" --what=sample --pn=1M --batch_size=1 --t5_layers=24 --warmup=2 \
    --iters=3 --compile=True
echo "done in $SECONDS s: $results" >>"$log"
$py - "$dir" <<'SUMMARY' | tee -a "$log"  # the table: one row per step, with its figures and each CUDA test
import json, os, sys, xml.etree.ElementTree as ET
folder = sys.argv[1]
lines = [json.loads(line) for line in open(os.path.join(folder, "gpu.jsonl")) if line.strip()]
shown = {"train": "tokens_per_s {} tok/s, step_s step {} s, mfu MFU {}, peak_mem_GiB peak {} GiB",
         "sample": "text_s text {} s, generate_s generate {} s, decode_s decode {} s, peak_mem_GiB peak {} GiB"}
def figures(r):  # "key text {}, ..." -> the texts filled with r[key]
    return ", ".join(f.split(" ", 1)[1].format(r.get(f.split(" ", 1)[0])) for f in shown[r["what"]].split(", "))
print(f"{'step':<22}{'rc':>5}{'seconds':>9}  figures")
for s in (r for r in lines if "what" not in r):
    done = "; ".join(figures(r) for r in lines if r.get("what") in shown and r["step"] == s["step"])
    rc, secs = ("-", "-") if s["rc"] is None else (s["rc"], s["seconds"])
    note = "timed out" if rc == 124 else "failed: see gpu.log" if rc else ""
    print(f"{s['step']:<22}{rc:>5}{secs:>9}  {s.get('skipped') or done or note}")
    xml = os.path.join(folder, "cuda_tests.xml")
    for case in ET.parse(xml).getroot().iter("testcase") if s["step"] == "cuda_tests" and os.path.exists(xml) else ():
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        print(f"    {case.get('name')}: {outcome} ({float(case.get('time', 0)):.1f} s)")
SUMMARY
