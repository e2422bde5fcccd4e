#!/usr/bin/env bash
# Time model.engine with trtexec at every batch size of the package (CUDA graphs, no host-device copies, spin-wait),
# one times-bN.json per batch size. Then, where craft-deploy is installed (the files can be copied there):
#   craft-deploy bench --from-trtexec . --out bench      # bench.json that `--baseline` gates on
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=build.env
. ./build.env

duration="${DURATION:-10}"
trtexec="${TRTEXEC:-trtexec}"
if ! command -v "$trtexec" > /dev/null 2>&1 && [ -x /usr/src/tensorrt/bin/trtexec ]; then
    trtexec=/usr/src/tensorrt/bin/trtexec
fi
if ! command -v "$trtexec" > /dev/null 2>&1; then
    echo "error: trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2
    exit 127
fi
if [ ! -f model.engine ]; then
    echo "error: model.engine is missing; run ./build_engine.sh first" >&2
    exit 2
fi

for batch in $BATCH_SIZES; do
    "$trtexec" --loadEngine=model.engine "--shapes=${INPUT_NAME}:${batch}x${CHW}" \
        --useCudaGraph --noDataTransfers --useSpinWait --warmUp=500 "--duration=${duration}" \
        --percentile=50,90,99 "--exportTimes=times-b${batch}.json" 2>&1 | tee "bench-b${batch}.log"
done
echo "timings in times-b*.json; craft-deploy bench --from-trtexec . --out DIR turns them into bench.json" >&2
