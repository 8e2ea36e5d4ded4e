#!/usr/bin/env bash
# One prepared GPU check (<= 8 minutes on an H200-class machine), printing:
#   (a) images/s of the model alone on synthetic batches (xresnet50, xresnet18; 128 and 224 px;
#       eager, channels_last, bf16): bench/step_bench.py
#   (b) ShardStream images/s with all cores: bench/stream_bench.py --only shardstream decode-all
#   (c) `tench fit` end to end: images/s and the share of time spent waiting for data
#   (d) the optimizer step on the GPU: bench/optim_bench.py --device cuda
# Without a CUDA GPU each CUDA part says it is skipped; (b) still runs.
#   bench/device_check.sh            # the full check
#   bench/device_check.sh --quick    # tiny inputs: checks every path in seconds (the tests use it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
WORK=${DEVICE_CHECK_WORK:-$(mktemp -d /tmp/tench-device-check.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has_cuda=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
has_ray=$($PY -c 'import ray, fastprogress' >/dev/null 2>&1 && echo 1 || echo 0)
echo "== device check: python $($PY -c 'import sys; print(sys.version.split()[0])'), torch $($PY -c 'import torch; print(torch.__version__)'), cuda $has_cuda, ray $has_ray, cores $(nproc)"
[ "$has_cuda" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== (a) model alone, synthetic batches"
if [ "$has_cuda" = 1 ]; then
    if [ $QUICK = 1 ]; then
        $PY bench/step_bench.py --device cuda --arch xresnet18 --size 32 --quick
    else
        $PY bench/step_bench.py --device cuda --arch xresnet50 xresnet18 --size 128 224 \
            --bs 128 --steps 20 --rounds 3
    fi
else
    echo "skipped: no CUDA GPU here (torch.cuda.is_available() is False)"
fi

echo "== (b) ShardStream, all cores"
if [ "$has_ray" = 1 ]; then
    if [ $QUICK = 1 ]; then
        $PY bench/stream_bench.py --images 200 --rounds 1 --only shardstream --work "$WORK/stream"
    else
        $PY bench/stream_bench.py --images 20000 --rounds 1 --only decode-all shardstream \
            --work "$WORK/stream"
    fi
else
    echo "skipped: ray or fastprogress not importable by $PY (carry their wheels: see device README)"
fi

echo "== (c) tench fit end to end"
if [ "$has_ray" = 1 ] && { [ "$has_cuda" = 1 ] || [ $QUICK = 1 ]; }; then
    per_class=1000; epochs=3; size=128; arch=xresnet18
    [ $QUICK = 1 ] && { per_class=6; epochs=1; size=32; arch=cnn; }
    $PY -m trainer.cli sample "$WORK/images" --per-class $per_class --seed 0 --force >/dev/null &&
    $PY -m trainer.cli shard "$WORK/images" "$WORK/shards" --force >/dev/null &&
    $PY -m trainer.cli fit "$WORK/shards" --out "$WORK/run" --force --arch $arch \
        --epochs $epochs --size $size --seed 0 &&
    $PY - "$WORK/run/metrics.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    wait, secs = r.get("data_wait"), r.get("seconds")
    share = f"{wait / secs:.1%}" if wait is not None and secs else "n/a"
    print(f"epoch {r['epoch']}: {r.get('images_per_s', 'n/a')} images/s, data_wait {wait} s "
          f"({share} of the epoch), accuracy {r.get('accuracy')}")
PYEOF
else
    echo "skipped: needs a CUDA GPU and ray (cuda $has_cuda, ray $has_ray)"
fi

echo "== (d) optimizer step"
if [ "$has_cuda" = 1 ]; then
    rounds=21; [ $QUICK = 1 ] && rounds=1
    $PY bench/optim_bench.py --device cuda --rounds $rounds
else
    echo "skipped: no CUDA GPU here"
fi
echo "== device check done"
