#!/usr/bin/env bash
# The one prepared script for a session that is lent the device tool's H100/H200 (issue 18,
# items 1 and 5). One call of at most ~9.5 minutes, nothing else on the GPU:
#
#  1. compile warm-up of both speed shapes at once (`benchmarks.speed --warm-only`), so the timed
#     parts measure warm graphs;
#  2. the timed speed benchmark: PixArt-shaped DiT, random weights, 28 blocks x 1152 (18 heads x
#     64), bf16, batch 2 = batched CFG; eager / inductor / inductor + CUDA graphs / blockdance
#     N=2,4 with and without CUDA graphs, --counted (bd_compile.generation with the loop's
#     timesteps, and one sync-debug-mode "error" check generation per blockdance model),
#     median of 3 interleaved repeats:
#       (a) 4,096 tokens (PixArt-alpha 1024px: latent 128), DPM-Solver++ 30 steps;
#       (b) 1,024 tokens (DiT-XL/2's shape at 512px: latent 64), DDIM 50 steps;
#  3. `benchmarks.overhead --device cuda` at 1,024 tokens x 1152: host microseconds per call and
#     the torch.profiler breakdown (issue 18, item 1 on a GPU).
#
# Prepare, here, in the root of the checkout (git-ignored folder):
#
#   pip download diffusers==0.42.1 --no-deps -d .devcarry/
#
# then call the device tool once:
#
#   run(command="bash benchmarks/gpu.sh", carry=[".devcarry"], timeout_s=595)
#
# What comes back under files_at: env.txt (versions, part timings), logs.tar.gz (every log),
# speed-gpu-<gpu>-<part>.md/.csv and overhead-gpu-<gpu>.md/.json: copy them into
# benchmarks/results/.
#
# The device machine has torch 2.11 (CUDA 13), Python 3.12 and every diffusers dependency but no
# diffusers: the wheel in .devcarry/ is installed with --no-deps into /tmp/site.
#
# CPU smoke of the plumbing (tiny everything; how it is checked here; every table is moved to
# $OUT, none stays in benchmarks/results/):
#   OUT=/tmp/gpu-smoke GPU_SMOKE=1 bash benchmarks/gpu.sh
#
# PART=peers instead runs only `python -m benchmarks.peers_gpu` (issue 20: FLUX.1-dev's
# transformer, random weights, bf16, 1024 px, 28 steps: inductor with and without CUDA graphs,
# BlockDance static and calibrated + forecast, cache-dit + torch.compile at the same computed
# block fraction; its own 510 s budget) and copies peers-gpu-<gpu>.md/.json into $OUT. Its
# cache-dit rows need the wheel too (else they say "not run"):
#   pip download cache-dit==1.5.3 --no-deps -d .devcarry/
#   run(command="PART=peers bash benchmarks/gpu.sh", carry=[".devcarry"], timeout_s=595)
# CPU smoke: OUT=/tmp/peers-smoke PART=peers GPU_SMOKE=1 bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT" /tmp/gpu-logs
LOGS=/tmp/gpu-logs
START=$(date +%s)
BUDGET=${BUDGET:-565}        # seconds until the last part must have stopped
WARM_S=${WARM_S:-250}        # the compile warm-up's limit
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
elapsed() { echo $(( $(date +%s) - START )); }

PY=python3
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .devcarry/diffusers-*.whl || { echo "no diffusers wheel in .devcarry/ (see header)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [[ "${PART:-}" == peers ]]; then  # issue 20's peers at FLUX.1-dev's size, alone
  if ! $PY -c "import cache_dit" 2>/dev/null && ls .devcarry/cache_dit-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .devcarry/cache_dit-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  PEERS=(); [[ -n "${GPU_SMOKE:-}" ]] && PEERS=(--tiny --compiler eager --repeats 1)
  timeout --kill-after=10 560 $PY -m benchmarks.peers_gpu --results "$OUT" "${PEERS[@]}" \
    2>&1 | tee "$LOGS/peers.log"
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz" .
  ls -la "$OUT"
  exit 0
fi

if [[ -n "${GPU_SMOKE:-}" ]]; then  # CPU smoke: tiny shapes, seconds
  DEV=(--device cpu --dtype float32 --blocks 2 --width 64 --repeats 1 --intervals 2)
  SHAPE_A=(--latent 8) SHAPE_B=(--latent 8)
  OVERHEAD=(--device cpu --blocks 2 --width 64 --latent 4 --steps 4 --repeats 1)
else
  DEV=(--device cuda --dtype bfloat16 --blocks 28 --width 1152 --repeats 3 --intervals 2 4)
  SHAPE_A=(--latent 128) SHAPE_B=(--latent 64)
  OVERHEAD=(--device cuda --blocks 28 --width 1152 --latent 64 --steps 50 --repeats 3)
fi
GPU=$($PY -c 'import re, torch; m = torch.cuda.is_available() and re.search(r"[A-Z]\d{2,}", torch.cuda.get_device_name()); print(m.group(0).lower() if m else "nogpu")')
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
  git log -1 --oneline 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
note() { echo "[$(elapsed) s] $*" | tee -a "$OUT/env.txt"; }

# --- 1. compile warm-up of both shapes ---
COMMON=(--cudagraphs --counted --no-compile-times "${DEV[@]}")
timeout --kill-after=10 "$WARM_S" $PY -m benchmarks.speed "${COMMON[@]}" --warm-only \
  --repeats 1 --tag warm-a "${SHAPE_A[@]}" --scenarios dpm30 >"$LOGS/warm-a.log" 2>&1 &
WARM_A=$!
timeout --kill-after=10 "$WARM_S" $PY -m benchmarks.speed "${COMMON[@]}" --warm-only \
  --repeats 1 --tag warm-b "${SHAPE_B[@]}" --scenarios ddim50 >"$LOGS/warm-b.log" 2>&1 &
WARM_B=$!
wait $WARM_A; note "warm-up a: rc $?"
wait $WARM_B; note "warm-up b: rc $?"

# --- 2. the timed benchmark, GPU otherwise idle ---
part() {  # part NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  note "part $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" $PY -m benchmarks.speed "${COMMON[@]}" \
    --tag "gpu-$GPU-$name" "$@" >"$LOGS/$name.log" 2>&1
  note "part $name: rc $?, $(( $(date +%s) - t0 )) s"
  mv benchmarks/results/speed-gpu-"$GPU-$name".{md,csv} "$OUT"/ 2>/dev/null || true
  tail -n 20 "$LOGS/$name.log"
}
LEFT=$(( BUDGET - $(elapsed) ))
part pixart1024 $(( LEFT * 45 / 100 )) "${SHAPE_A[@]}" --scenarios dpm30
part dit512 $(( (BUDGET - $(elapsed)) * 60 / 100 )) "${SHAPE_B[@]}" --scenarios ddim50 \
  --note "DiT-XL/2's shape (28 x 1152, 1,024 tokens) with PixArt's blocks: speed.py builds only PixArt-shaped models (cross-attention to 16 text tokens instead of DiT's class label)."

# --- 3. host overhead per call at 1,024 tokens, with its profile ---
t0=$(date +%s)
note "overhead (limit $(( BUDGET - $(elapsed) )) s)"
timeout --kill-after=10 $(( BUDGET - $(elapsed) )) $PY -m benchmarks.overhead "${OVERHEAD[@]}" \
  --tag "gpu-$GPU" >"$LOGS/overhead.log" 2>&1
note "overhead: rc $?, $(( $(date +%s) - t0 )) s"
mv benchmarks/results/overhead-gpu-"$GPU".{md,json} "$OUT"/ 2>/dev/null || true
tail -n 30 "$LOGS/overhead.log"

note "total"
tar -C "$LOGS" -czf "$OUT/logs.tar.gz" .
ls -la "$OUT"
