#!/bin/bash
# qa1_reference sweep on the GPU: runs in parallel, each its own process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import sentencepiece, jax; print(jax.devices())" 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
run() { name=$1; shift; timeout ${T:-530} python3 -m benchmarks.qa1_reference --eval_every=1000 --workers=2 "$@" > $OUT/$name.log 2>&1 & }
run base_d64_b32 --steps=12000
run d64_b256 --steps=10000 --batch=256
run d128_b256 --steps=10000 --batch=256 --d_model=128
run d256h8_b256_lr5e-4 --steps=10000 --batch=256 --d_model=256 --heads=8 --learning_rate=5e-4
run d64_b32_story --steps=12000 --story_loss
run d128_b256_story --steps=10000 --batch=256 --d_model=128 --story_loss
wait
tail -n 4 $OUT/*.log
