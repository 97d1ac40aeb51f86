#!/bin/bash
# qa1_reference sweep on the GPU: runs in parallel, each its own process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import sentencepiece, jax; print(jax.devices())" 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
run() { name=$1; shift; timeout ${T:-530} python3 -m benchmarks.qa1_reference --eval_every=1000 --workers=4 "$@" > $OUT/$name.log 2>&1 & }
run d64_b256_s2 --steps=10000 --batch=256 --seed=2
run d64_b256_s3 --steps=10000 --batch=256 --seed=3
run d64_b256_s4 --steps=10000 --batch=256 --seed=4
wait
for f in $OUT/*.log; do echo == $f; grep step $f | cut -c1-75; done
