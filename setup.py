"""lm2-jax: decoder language models with explicit, trainable memory (LM2 and friends) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="lm2-jax",
    version="0.1.0",
    description="Large Memory Models (LM2) and other memory-augmented decoders in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lm2_jax", "lm2_jax.*"]),
    install_requires=[
        "absl-py",
        "array_record",
        "etils[epath]",
        "flax>=0.10",
        "grain>=0.2.12",
        "jax>=0.6",
        "matplotlib",
        "ml-collections",
        "ml_dtypes",
        "numpy",
        "optax",
        "orbax-checkpoint>=0.11",
        "safetensors",
        "sentencepiece",
        "tensorboardX",
        "tensorflow-datasets",
    ],
    extras_require={
        # Hugging Face interop is torch-free; these are for checking it against `transformers`.
        "torch": ["torch", "transformers>=4.45"],
        # torch is capped at the CPU build this project's machines carry; newer releases work too.
        "test": ["chex", "ipykernel", "nbclient", "pytest", "pytest-xdist", "torch<2.14", "transformers>=4.45"],
        # The PyTorch peers of benchmarks/peers.py, at the versions its numbers were measured with.
        "peers": ["torch<2.14", "recurrent-memory-transformer-pytorch==0.7.0", "titans-pytorch==0.5.5"],
    },
)
