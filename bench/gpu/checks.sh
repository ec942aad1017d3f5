#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, as one command for a lent GPU machine (prepare.sh first,
# here; then run(command="bash bench/gpu/checks.sh", carry=[".gpu_carry"], timeout_s=600)).
#  0. exact (issue 4): bench/rev_grad_error.py on CUDA (SmolLM2's architecture, random
#     weights): do the exact streams reconstruct every layer's inputs bit for bit there
#     (the recompute must reproduce the forward), and the gradient errors per depth;
#  1. reversible (issue 4): bench/rev_speed.py on CUDA at the LLaMA-7B shape, bf16, seq
#     2048, batch 1: step-time ratios, tokens/s and each config's peak step memory;
#  2. sparse (issue 3): launch/train.py with ds_configs/24gb.json, LLaMA-7B shape, a 10%
#     sparse adapter, GSM8K at up to GPU_CHECKS_SPARSE_SEQ (256) tokens, micro-batch 4,
#     capped at 24 GiB
#     (--gpu_memory_gib), then parallel_adapter of the same width held on the GPU
#     (24gb.json without optimizer offload), uncapped; bench/gpu/summary.py compares them;
#  3. syncs (issue 19.6): bench/sparse_host_syncs.py on CUDA (SmolLM2-135M's shape, random
#     weights): host synchronisation points per layer of the sparse step, which must equal
#     the CPU's count (bench/results/sparse_host_syncs.json, "after"), and the CUDA paths
#     (pinned staging, side streams, events, the gradient receiver) run for real.
# GPU_CHECKS_PARTS="exact rev syncs sparse" (default) picks the parts: at the 7B shape "sparse"
# alone takes several minutes (two 7B models initialised on the host, the CPU Adam
# builds), so run it in its own call: GPU_CHECKS_PARTS="sparse", then "exact rev".
# Results land in $OUT (the device tool's output folder). A dry run on a CPU machine checks
# the plumbing with small settings:
#   OUT=/tmp/gpu_out GPU_CHECKS_MODEL=smollm2-135m GPU_CHECKS_STEPS=3 GPU_CHECKS_SEQ=64 \
#     GPU_CHECKS_SPARSE_SEQ=64 PY=.venv/bin/python bash bench/gpu/checks.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=${CARRY:-.gpu_carry}
OUT=${OUT:-/tmp/gpu_out}
RUNS=${RUNS:-/tmp/gpu_runs}
PY=${PY:-python3}
MODEL=${GPU_CHECKS_MODEL:-llama2-7b-shape}
STEPS=${GPU_CHECKS_STEPS:-8}
SEQ=${GPU_CHECKS_SEQ:-2048}
SPARSE_SEQ=${GPU_CHECKS_SPARSE_SEQ:-256}  # part 2: GSM8K questions up to this many tokens
CAP=${GPU_CHECKS_CAP:-24}
PARTS=${GPU_CHECKS_PARTS:-exact rev syncs sparse}
mkdir -p "$OUT" "$RUNS"
rm -rf "$RUNS/sparse" "$RUNS/dense" "$RUNS/dense.json"  # a rerun on a warm machine
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The carried cache holds SmolLM2's tokenizer only: enough for the random-weight shapes.
[[ -d "$CARRY/cache" && "$MODEL" == *-shape ]] && export MEFT_DS_CACHE=$PWD/$CARRY/cache
[ -d "$CARRY/data" ] && export MEFT_DS_DATA=$PWD/$CARRY/data
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
device=cpu && [ "$cuda" = 1 ] && device=cuda
cap=() && [ "$cuda" = 1 ] && cap=(--gpu_memory_gib "$CAP")
"$PY" -c "import torch, deepspeed, transformers, peft, safetensors, psutil, matplotlib, tqdm
print('torch', torch.__version__, 'ds', deepspeed.__version__, 'transformers',
      transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1

if [[ " $PARTS " == *" exact "* ]]; then
echo "== 0. reversible exactness and gradient error on $device =="
"$PY" bench/rev_grad_error.py --device "$device" --model smollm2-135m-shape \
  --name rev_grad_error_$device --out "$OUT" 2>&1 | grep -v Warning | tail -n 20
fi

if [[ " $PARTS " == *" rev "* ]]; then
echo "== 1. reversible step time, tokens/s, peak memory ($MODEL, seq $SEQ) =="
"$PY" bench/rev_speed.py --device "$device" --model "$MODEL" --seq "$SEQ" --batch 1 \
  --dtypes bf16 --configs parallel_adapter,meft1,meft1_eager,meft2,meft3,meft1_keep2 --reps 3 --warmup 1 --no-flops \
  --name rev_speed_gpu --out "$OUT" 2>&1 | grep -v Warning | tail -n 12
rc=${PIPESTATUS[0]}; echo "rc $rc (inexact_backwards in rev_speed_gpu.json must be 0)"
[ "$rc" = 0 ] || exit 1
fi
if [[ " $PARTS " == *" syncs "* ]]; then
echo "== 3. host sync points per layer of the sparse step on $device =="
"$PY" bench/sparse_host_syncs.py --device "$device" --label "$device" \
  --model smollm2-135m-shape --optimizer torch --out "$OUT/sparse_host_syncs" 2>&1 \
  | grep -v Warning | tail -n 4
rc=${PIPESTATUS[0]}; echo "rc $rc (per layer: forward <= 1 + 1/layers, backward 0)"
[ "$rc" = 0 ] || exit 1
fi
[[ " $PARTS " == *" sparse "* ]] || exit 0

common=(--model "$MODEL" --dataset gsm8k --max_seq_len "$SPARSE_SEQ" --micro_batch_size 4 --grad_accum 1
        --max_steps "$STEPS" --train_examples 64 --eval_trained 0 --eval_heldout 0
        --eval_before false --eval_steps 0 --save_steps 0 --save_final false --progress false)
echo "== 2a. sparse adapter, 10%, capped at ${CAP} GiB =="
"$PY" launch/train.py --deepspeed ds_configs/24gb.json --method sparse \
  --sparse_param_fraction 0.1 "${common[@]}" "${cap[@]}" --output_dir "$RUNS/sparse" \
  > "$RUNS/sparse.log" 2>&1
rc=$?; echo "rc $rc"; grep -v Warning "$RUNS/sparse.log" | tail -n 8
[ "$rc" = 0 ] || { cp "$RUNS/sparse.log" "$OUT/"; exit 1; }
rank=$("$PY" -c "import json; print(json.load(open('$RUNS/sparse/adapter/adapter_config.json'))['options']['sparse_rank'])")
"$PY" - "$RUNS/dense.json" <<'PY'
import json, sys
cfg = json.load(open("ds_configs/24gb.json"))
cfg["zero_optimization"].pop("offload_optimizer")  # the dense adapter's Adam on the GPU
cfg["optimizer"]["params"]["torch_adam"] = True  # torch's AdamW: no FusedAdam nvcc build
cfg.pop("meft")
json.dump(cfg, open(sys.argv[1], "w"))
PY
echo "== 2b. parallel_adapter of the same width ($rank), uncapped =="
"$PY" launch/train.py --deepspeed "$RUNS/dense.json" --method parallel_adapter \
  --adapter_size "$rank" "${common[@]}" --output_dir "$RUNS/dense" > "$RUNS/dense.log" 2>&1
echo "rc $?"; grep -v Warning "$RUNS/dense.log" | tail -n 8
cp "$RUNS/sparse.log" "$RUNS/dense.log" "$OUT/"
"$PY" bench/gpu/summary.py "$RUNS" "$OUT"
ls -la "$OUT"
