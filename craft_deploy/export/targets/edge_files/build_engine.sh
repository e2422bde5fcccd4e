#!/usr/bin/env bash
# Build model.engine from model.onnx with trtexec, on the device that will run it (a TensorRT engine is specific to
# the GPU, the TensorRT version and the builder settings). Written by `craft-deploy export --format edge`.
#
#   ./build_engine.sh              # GPU
#   ./build_engine.sh --dla 0      # Jetson: DLA core 0, layers DLA cannot run fall back to the GPU
#
# Environment: TRTEXEC=/path/to/trtexec when it is neither on PATH nor in /usr/src/tensorrt/bin.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=build.env
. ./build.env

dla_core=""
usage() {
    echo "usage: $0 [--dla CORE]"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --dla)
            [ $# -ge 2 ] || { usage >&2; exit 2; }
            dla_core="$2"
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "error: unknown option $1" >&2
            usage >&2
            exit 2
            ;;
    esac
done

trtexec="${TRTEXEC:-trtexec}"
if ! command -v "$trtexec" > /dev/null 2>&1 && [ -x /usr/src/tensorrt/bin/trtexec ]; then
    trtexec=/usr/src/tensorrt/bin/trtexec
fi
if ! command -v "$trtexec" > /dev/null 2>&1; then
    echo "error: trtexec not found (looked for '$trtexec' on PATH and /usr/src/tensorrt/bin/trtexec). Install" \
        "TensorRT 10 or 11 (JetPack on a Jetson; the TensorRT tar/deb packages or an NGC container on a server)" \
        "or set TRTEXEC=/path/to/trtexec" >&2
    exit 127
fi

# trtexec prints its version as [TensorRT vMMmmpp] (v100300 = 10.3.0); 8.x printed vMmpp (v8601)
version="$("$trtexec" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
if [ -z "$version" ]; then
    echo "error: could not read the TensorRT version from '$trtexec --help'" >&2
    exit 3
fi
if [ "$version" -ge 100000 ]; then major=$((version / 10000)); else major=$((version / 1000)); fi
if [ "$major" -lt 10 ]; then
    echo "error: TensorRT $major.x found; this package needs TensorRT 10 or 11 (strongly typed networks)" >&2
    exit 3
fi

args=(
    --onnx=model.onnx
    --saveEngine=model.engine
    "--minShapes=${INPUT_NAME}:${MIN_SHAPE}"
    "--optShapes=${INPUT_NAME}:${OPT_SHAPE}"
    "--maxShapes=${INPUT_NAME}:${MAX_SHAPE}"
    --timingCacheFile=timing.cache
    "--builderOptimizationLevel=${BUILDER_OPTIMIZATION_LEVEL}"
    --profilingVerbosity=detailed
    --exportLayerInfo=layers.json
    --skipInference
)
# TensorRT 10 builds strongly typed networks on request; 11 always does and dropped the precision flags
if [ "$major" -eq 10 ]; then
    args+=(--stronglyTyped)
fi
if [ "$SPARSE" = 1 ]; then
    args+=(--sparsity=enable)
fi
if [ -n "$dla_core" ]; then
    args+=("--useDLACore=${dla_core}" --allowGPUFallback)
fi

echo "TensorRT $major.x ($trtexec): building model.engine" >&2
"$trtexec" "${args[@]}" 2>&1 | tee build.log
echo "built model.engine; layer info in layers.json; next: python3 verify.py" >&2
