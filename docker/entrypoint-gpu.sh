#!/usr/bin/env bash
# Start tritonserver on a TensorRT-LLM engine repository: one process for WORLD_SIZE=1, otherwise one MPI
# rank per GPU (what TensorRT-LLM's launch_triton_server.py does): rank 0 serves HTTP/gRPC/metrics, the
# other ranks load only the tensorrt_llm model and take part in the tensor/pipeline-parallel execution.
set -euo pipefail
repo="${MODEL_REPO:-/artifacts/model/triton/trtllm}"
world="${WORLD_SIZE:-1}"
read -r http grpc metrics <<< "${TRTCOMPRESS_PORTS:-8000 8001 8002}"
if [[ ! -f "${repo}/tensorrt_llm/config.pbtxt" ]]; then
  echo "error: ${repo} is not a TensorRT-LLM Triton repository (build one with: trtcompress build MODEL" \
       "--recipe R --engine -o ARTIFACT; then MODEL_REPO=ARTIFACT/triton/trtllm)" >&2
  exit 2
fi
common=(--model-repository="${repo}" --disable-auto-complete-config)
if [[ "${world}" == "1" ]]; then
  exec tritonserver "${common[@]}" --http-port="${http}" --grpc-port="${grpc}" --metrics-port="${metrics}" "$@"
fi
cmd=(mpirun --allow-run-as-root)
for ((rank = 0; rank < world; rank++)); do
  [[ ${rank} -gt 0 ]] && cmd+=(:)
  cmd+=(-n 1 tritonserver "${common[@]}" "--backend-config=python,shm-region-prefix-name=prefix${rank}_")
  if [[ ${rank} -eq 0 ]]; then  # (the container's arguments, e.g. --log-verbose=1, go to the serving rank)
    cmd+=(--http-port="${http}" --grpc-port="${grpc}" --metrics-port="${metrics}" "$@")
  else
    cmd+=(--model-control-mode=explicit --load-model=tensorrt_llm --allow-http=false --allow-grpc=false
          --allow-metrics=false)
  fi
done
exec "${cmd[@]}"
