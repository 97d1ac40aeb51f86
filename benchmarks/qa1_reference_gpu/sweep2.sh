#!/bin/bash
# qa1_reference sweep on the GPU: runs in parallel, each its own process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import sentencepiece, jax; print(jax.devices())" 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
run() { name=$1; shift; timeout ${T:-530} python3 -m benchmarks.qa1_reference --eval_every=1000 --workers=2 "$@" > $OUT/$name.log 2>&1 & }
run d64_b256_s1 --steps=10000 --batch=256 --seed=1
run d64_b256_lr3e-3 --steps=10000 --batch=256 --learning_rate=3e-3
run d64_b256_cur4 --steps=10000 --batch=256 --curriculum_steps=2000 --max_sentences=4
run d64_L2_b256 --steps=10000 --batch=256 --layers=2
run d64_b128 --steps=10000 --batch=128
run d64_b1024_lr2e-3 --steps=3000 --batch=1024 --learning_rate=2e-3 --eval_every=250
wait
for f in $OUT/*.log; do echo == $f; grep step $f | cut -c1-75; done
