#!/bin/bash
# The H100 sweep of benchmarks.qa1_reference (2026-11-25), as it ran through this project's device tool: from the
# repository root, `bash benchmarks/qa1_reference_gpu/sweep.sh N` (N = 1, 2, 3), logs to $OUT/<run>.log.
# The runs of a sweep share the GPU and its 16 cores; each is cut at ${T} seconds. Sweep 3 ran with T=535.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
WORKERS=2
run() { name=$1; shift; timeout ${T:-530} python3 -m benchmarks.qa1_reference --eval_every=1000 --workers=$WORKERS "$@" \
  > $OUT/$name.log 2>&1 & }
case $1 in
  1)
    run base_d64_b32 --steps=12000
    run d64_b256 --steps=10000 --batch=256
    run d128_b256 --steps=10000 --batch=256 --d_model=128
    run d256h8_b256_lr5e-4 --steps=10000 --batch=256 --d_model=256 --heads=8 --learning_rate=5e-4
    run d64_b32_story --steps=12000 --story_loss
    run d128_b256_story --steps=10000 --batch=256 --d_model=128 --story_loss ;;
  2)
    run d64_b256_s1 --steps=10000 --batch=256 --seed=1
    run d64_b256_lr3e-3 --steps=10000 --batch=256 --learning_rate=3e-3
    run d64_b256_cur4 --steps=10000 --batch=256 --curriculum_steps=2000 --max_sentences=4
    run d64_L2_b256 --steps=10000 --batch=256 --layers=2
    run d64_b128 --steps=10000 --batch=128
    run d64_b1024_lr2e-3 --steps=3000 --batch=1024 --learning_rate=2e-3 --eval_every=250 ;;
  3)
    WORKERS=4
    run d64_b256_s2 --steps=10000 --batch=256 --seed=2
    run d64_b256_s3 --steps=10000 --batch=256 --seed=3
    run d64_b256_s4 --steps=10000 --batch=256 --seed=4 ;;
esac
wait
for f in $OUT/*.log; do echo "== $f"; grep step "$f" | cut -c1-75; done
