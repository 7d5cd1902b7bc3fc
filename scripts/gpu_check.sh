#!/usr/bin/env bash
# Issue 14's checks on one CUDA GPU, in one go: the GPU benchmark table (scripts/bench.py
# --device cuda), where the MoE spends its time (--profile: ops, kernel launches, top host and
# device times), the CUDA tests of the fast paths (FlexAttention sliding window, Triton scan,
# sync-free MoE, Triton routing and row moves), and short compiled bf16 runs of experiment=gpu_lm (dense, then MoE) for MFU.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (logs in OUT_DIR, default ./gpu_check)
set -u
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$out/env.txt"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $out/NAME.txt
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s"
}
step 170 bench python3 scripts/bench.py --device cuda
step 60 profile python3 scripts/bench.py --device cuda --profile
lm=(python3 train.py experiment=gpu_lm trainer.max_steps=60 trainer.val_check_interval=60
    trainer.log_every_n_steps=10 +trainer.limit_val_batches=0 test=false logger=csv
    "paths.cache_dir=$PWD/.cache")
step 130 lm_dense "${lm[@]}"
step 110 tests python3 -m pytest -q -p no:cacheprovider tests/models/blocks/test_flex_window.py \
  tests/models/blocks/test_selective_scan_triton.py tests/models/blocks/test_moe.py \
  tests/models/blocks/test_moe_routing_triton.py tests/models/blocks/test_moe_permute_triton.py
step 100 lm_moe "${lm[@]}" model=moe model.ffn_hidden=2048
for f in bench lm_dense tests lm_moe; do echo "== $f"; tail -n 40 "$out/$f.txt"; done
echo "== profile (tables in $out/profile.txt)"; grep -h "aten ops" "$out/profile.txt"
