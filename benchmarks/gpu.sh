#!/usr/bin/env bash
# One prepared GPU speed benchmark for the device tool's lent H100/H200 (issue 11, item 4).
# NOT RUN YET: nothing below has been seen on a GPU; every number is an estimate.
#
# Prepare, here, in the root of the checkout the session was started in (the device tool sends
# that checkout, not a helper's worktree, so this file must be in it: merge branch `gpu` first):
#
#   pip download diffusers==0.42.1 --no-deps -d .devcarry/    # 6.4 MB, py3-none-any;
#                                                             # .devcarry/ is git-ignored
# Then call the device tool once:
#
#   run(command="bash benchmarks/gpu.sh", carry=[".devcarry"], timeout_s=590)
#
# and call give_back afterwards unless you rerun at once. What comes back under files_at: for
# each part speed-gpu-<gpu>-<part>.md/.csv and <part>.log, plus env.txt (7 files; the tool
# returns at most 8). The .md/.csv are also written to benchmarks/results/ there (not here:
# copy them from files_at into benchmarks/results/ to commit them).
#
# The device machine has torch 2.11 (CUDA 13), Python 3.12 and every diffusers dependency
# (huggingface-hub 1.33, safetensors 0.8, numpy, Pillow, regex, requests, filelock) but no
# diffusers: the wheel in .devcarry/ is installed with --no-deps into /tmp/site. bd_compile
# itself runs from the tree (`python3 -m benchmarks.speed` from the repo root; importing
# bd_compile registers backend="blockdance").
#
# Parts (both: PixArt-shaped DiT, random weights, 28 blocks x 1152 (18 heads x 64), bf16,
# batch 2 = batched CFG, eager / inductor / inductor + CUDA graphs / blockdance N=2,3,4 with
# and without CUDA graphs, --counted (bd_compile.generation with the loop's timesteps, and one
# sync-debug-mode "error" check generation per blockdance model), median of 2 generations):
#   (a) PixArt-alpha 1024px: latent 128 (4,096 tokens), DPM-Solver++ 30 steps.
#   (b) DiT-XL/2's shape at 512px: latent 64 (1,024 tokens), DDIM 50 steps. speed.py builds
#       only PixArt blocks (cross-attention to 16 text tokens, adaLN-single), not DiT's
#       class-conditioned blocks: the caption of its table says so.
#
# Estimate (FLOPs per call counted by torch.utils.flop_counter on the meta device, batch 2;
# H200 bf16 ~790 TFLOP/s dense measured on an 8k matmul, ~300-400 realistic for this model):
#   (a) 4,096 tokens: 12.9 TFLOP per call, ~35 ms per call at 350 TFLOP/s, ~1.1 s per
#       inductor generation; 29 generations (9 warm-ups, 9 rows x 2, 2 checks; eager slower)
#       ~40 s of sampling. Cold compiles of 4 models (inductor, inductor + CUDA graphs,
#       blockdance, blockdance + CUDA graphs; blockdance = 3 graphs) ~1 min each on 16 cores:
#       ~4-5 min in all. Limit 330 s.
#   (b) 1,024 tokens: 2.4 TFLOP per call, ~7 ms, ~0.4 s per generation (50 steps), ~15 s of
#       sampling; the 4 models compile again for the new shape (~3-4 min). Limit: what is left
#       of a 540 s budget after (a) (at least 150 s).
# The whole script stays under ~9.5 min (the command limit is 10 min, the session's device
# time 15 min, start included). A part stopped at its limit leaves its log and, if its scenario
# finished, its results (speed.py writes them after each scenario, before its compile probes,
# which --no-compile-times skips anyway).
#
# CPU smoke of this script's plumbing (no GPU; tiny model; how it was checked here):
#   OUT=/tmp/gpu-smoke SPEED_EXTRA="--device cpu --dtype float32 --blocks 2 --width 64 \
#     --latent 8 --repeats 1 --intervals 2" bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=540
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache

PY=python3
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .devcarry/diffusers-*.whl || { echo "no diffusers wheel in .devcarry/ (see header)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

GPU=$($PY -c 'import re, torch; m = torch.cuda.is_available() and re.search(r"[A-Z]\d{2,}", torch.cuda.get_device_name()); print(m.group(0).lower() if m else "nogpu")')
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c 'import torch, diffusers, triton; print("torch", torch.__version__, "diffusers", diffusers.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
  $PY -c 'import bd_compile; print("bd_compile from", bd_compile.__file__)'
  git log -1 --oneline 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

COMMON=(--device cuda --dtype bfloat16 --blocks 28 --width 1152 --repeats 2
        --cudagraphs --counted --no-compile-times)

part() {  # part NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== part $name (limit ${limit} s)" | tee -a "$OUT/env.txt"
  # SPEED_EXTRA (unset on the GPU) comes last: its flags override (CPU smoke, header).
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$limit" $PY -m benchmarks.speed "${COMMON[@]}" \
    --tag "gpu-$GPU-$name" "$@" ${SPEED_EXTRA:-} >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== part $name: rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
  cp benchmarks/results/speed-gpu-"$GPU-$name".{md,csv} "$OUT"/ 2>/dev/null || true
  tail -n 25 "$OUT/$name.log"
}

part pixart1024 330 --latent 128 --scenarios dpm30

LEFT=$(( BUDGET - ($(date +%s) - START) ))
(( LEFT < 150 )) && LEFT=150
part dit512 "$LEFT" --latent 64 --scenarios ddim50 \
  --note "DiT-XL/2's shape (28 x 1152, 1,024 tokens) with PixArt's blocks: speed.py builds only PixArt-shaped models (cross-attention to 16 text tokens instead of DiT's class label)."

echo "total $(( $(date +%s) - START )) s" | tee -a "$OUT/env.txt"
ls -la "$OUT"
