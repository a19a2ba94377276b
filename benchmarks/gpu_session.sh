#!/bin/bash
# Every GPU measurement of issues 5 and 6 through a lent GPU machine, each step under its own time
# limit so one failure keeps the others, in this order:
#   invariance. benchmarks/plugin_invariance_gpu.py  whether the runtime's 4-bit layers keep a row's bits
#      whatever its batch (the start-up probe and its 16-row-tile fallback), and their distance from the
#      CPU reference (never run on a GPU yet; under 2 minutes)
#   0. benchmarks/gemv_graphs_gpu.py --group-major  the layout the CUDA runtime holds INT4 weights in
#      (GroupMajorWeight): the lop3 GEMV tuned over it, the group-major op against the row-layout op
#      at M = 1..16 and a 256-row prefill (graph replays, L2 cold); group_major_8b: the same on a
#      Llama-3-8B layer's GEMV shapes as the CUDA runtime runs them (untimed so far)
#   1. benchmarks/runtime_gpu.py  native runtime vs HF generate, end to end (needs .gpu/, see below);
#      fp16 first with deploy.cuda_graphs (runtime/cuda_graphs.py), then without it
#      (paged decode kernel), A/B against the torch path at 32
#   2. benchmarks/gemv_graphs_gpu.py  decode GEMVs (lop3, packed-fp16, tensor-core) vs bf16 matmul,
#      replayed from CUDA graphs with the weights read from HBM (35-50 s on an H200 before the ninth
#      session added the deeper-queue configs and the group-major layout to its tuning)
#   3. benchmarks/plugin_ptx_gpu.py run  the plugins' AOT PTX (if `prepare .gpu/ptx` ran on CPU)
#   4. benchmarks/gemm_gpu.py --gemv-only  W4A16 decode GEMVs (tensor-core and packed-fp16) vs bf16
#      matmul, 3 sizes, eager timing
#   5. benchmarks/gear_attention.py  decode-attention kernel vs fp16 SDPA (+ previous kernel, ablations),
#      both graph-replayed over cache copies that miss L2 (since the thirteenth session)
#   gear_splits (only when named in STEPS): benchmarks/gear_attention.py --splits, the kernel by split count
#   6. benchmarks/gemm_gpu.py --quick  prefill (GEMM and row-tiled tensor-core GEMV) and W4A4 at 4096
# Run through the device tool as `bash benchmarks/gpu_session.sh` with carry [".gpu"]
# (.gpu/gear_kernel_previous.py, if present: an older kernel.py timed beside the current one).
# .gpu/ (git-ignored) holds what the GPU image lacks: .gpu/whl/*.whl (pydantic and its three
# dependencies, for the runtime's config) and .gpu/model/ (SmolLM2-135M's config and tokenizer files);
# the docstring of benchmarks/runtime_gpu.py gives the commands that fill it.
# Results land in $OUT (the device tool brings them back); logs too.
# STEPS picks a subset (default: all), e.g. `STEPS="runtime gear" bash benchmarks/gpu_session.sh`.
set -u
STEPS=" ${STEPS:-invariance group_major group_major_8b runtime gear graphs gemv ptx prefill} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# most important first: a run cut short by the device's 600 s limit keeps what it measured. The steps'
# limits add up to more than one call may run (600 s): run a subset per call, e.g.
# STEPS="group_major_8b gear" (at most 500 s) for what the eleventh session left untimed, or
# STEPS="group_major runtime" (at most 410 s; 161 s on an H200 in the eleventh session), then
# STEPS="graphs gear" (at most 500 s; 225 s there before the gear step tuned both layer shapes)
if want invariance; then
  timeout 120 python3 benchmarks/plugin_invariance_gpu.py "$OUT/plugin_invariance_gpu.json" \
    > "$OUT/plugin_invariance.log" 2>&1
  echo "plugin_invariance_gpu rc $?"
fi
if want group_major; then
  timeout 240 python3 benchmarks/gemv_graphs_gpu.py "$OUT/gemv_group_major_gpu.json" --group-major \
    > "$OUT/gemv_group_major.log" 2>&1
  echo "gemv_graphs_gpu --group-major rc $?"
fi
if want group_major_8b; then  # the same on a Llama-3-8B layer's GEMV shapes (qkv, o, gate_up, down)
  timeout 200 python3 benchmarks/gemv_graphs_gpu.py "$OUT/gemv_group_major_llama8b_gpu.json" --group-major \
    --llama8b > "$OUT/gemv_group_major_8b.log" 2>&1
  echo "gemv_graphs_gpu --group-major --llama8b rc $?"
fi
if ! want runtime; then :
elif [ -d .gpu/whl ] && [ -d .gpu/model ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  PYTHONPATH=$PWD:/tmp/site timeout 170 python3 benchmarks/runtime_gpu.py "$OUT/runtime_gpu.json" \
    --model .gpu/model > "$OUT/runtime.log" 2>&1
  echo "runtime_gpu rc $?"
else
  echo "runtime_gpu skipped: .gpu/whl and .gpu/model were not carried"
fi
want graphs && timeout 200 python3 benchmarks/gemv_graphs_gpu.py "$OUT/gemv_graphs_gpu.json" > "$OUT/gemv_graphs.log" 2>&1
want graphs && echo "gemv_graphs_gpu rc $?"
if want ptx && [ -d .gpu/ptx ]; then  # the TensorRT plugins' AOT PTX through the CUDA driver (prepared on CPU)
  timeout 40 python3 benchmarks/plugin_ptx_gpu.py run .gpu/ptx "$OUT" > "$OUT/plugin_ptx.log" 2>&1
  echo "plugin_ptx_gpu rc $?"
fi
want gemv && timeout 160 python3 benchmarks/gemm_gpu.py "$OUT/gemm_gpu_gemv.json" --gemv-only > "$OUT/gemm.log" 2>&1
want gemv && echo "gemm_gpu (decode, 3 sizes) rc $?"
want gear && timeout 300 python3 benchmarks/gear_attention.py "$OUT/gear_attention_gpu.json" > "$OUT/gear.log" 2>&1
want gear && echo "gear_attention rc $?"
if want gear_splits; then  # the decode kernel's time by split count, for default_splits
  timeout 200 python3 benchmarks/gear_attention.py "$OUT/gear_attention_splits_gpu.json" --splits \
    > "$OUT/gear_splits.log" 2>&1
  echo "gear_attention --splits rc $?"
fi
want prefill && timeout 90 python3 benchmarks/gemm_gpu.py "$OUT/gemm_gpu_prefill_4096.json" --quick > "$OUT/gemm_prefill.log" 2>&1
want prefill && echo "gemm_gpu (prefill + W4A4, K = N = 4096) rc $?"
[ -f "$OUT/gear_splits.log" ] && grep -h "ctx\|wrote\|Error" "$OUT/gear_splits.log" | cut -c1-220
[ -f "$OUT/gear.log" ] && grep -h -E "speedup|correctness ok|wrote" "$OUT/gear.log" | tail -28 | cut -c1-220
[ -f "$OUT/gemm_gpu_gemv.json" ] && python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
for r in d['w4a16']:
    print(r['K'], r['M'], 'bf16 %.4f' % r['bf16_matmul_ms'],
          *('%s %.4f %.2fx' % (p, r[f'w4a16_{p}_ms'], r[f'w4a16_{p}_speedup_vs_bf16']) for p in ('gemv_tc', 'gemv_h2')))
for t in d['gemv_tc_tuning']:
    print(t['K'], 'tc', t['best'], 'h2', t['gemv_h2']['best'])
" "$OUT/gemm_gpu_gemv.json"
[ -f "$OUT/gemv_graphs.log" ] && grep -h "M= 1\|wrote" "$OUT/gemv_graphs.log" | cut -c1-200
for log in "$OUT"/gemv_group_major*.log; do
  [ -f "$log" ] && grep -h " K=\|wrote\|Error" "$log" | cut -c1-260
done
[ -f "$OUT/gemm_prefill.log" ] && grep -h "prefill\|GEMM config" "$OUT/gemm_prefill.log" | tail -3 | cut -c1-300
[ -f "$OUT/runtime.log" ] && grep -v Warning "$OUT/runtime.log" | tail -12
[ -f "$OUT/plugin_ptx.log" ] && tail -3 "$OUT/plugin_ptx.log"
# the device tool brings back at most 8 files: the logs travel as one archive
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
ls "$OUT"
