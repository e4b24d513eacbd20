"""softmax_one_jax: softmax-1 attention and OrthoAdam for JAX/Flax (Kaul et al., ICLR 2025)."""

import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent

setup(
    name="softmax_one_jax",
    version="0.1.0",
    description=(
        "softmax-1 attention, OrthoAdam and the outlier/quantisation analysis of "
        "'From Attention to Activation' (ICLR 2025) in JAX/Flax."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["softmax_one_jax", "softmax_one_jax.*"]),
    package_data={
        "softmax_one_jax.data": ["corpora/*.txt.gz", "corpora/*.md", "tokenizers/*.tiktoken"],
    },
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorstore>=0.1.70",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tiktoken>=0.8",
        "regex>=2023.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # The GCS emulator serves tests/training/test_bucket_workdir.py a bucket on localhost.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024.0", "gcsfs>=2024.2"],
        # gs:// workdirs: etils epath reads and writes buckets through gcsfs (which brings
        # google-cloud-storage, for the workdir lease's generation preconditions).
        "gcs": ["gcsfs>=2024.2"],
        # Pairing and executing notebooks/ (tests/test_notebooks.py); Colab needs none of it.
        "notebooks": ["jupytext>=1.16", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                      "matplotlib-inline>=0.1"],
        # libtpu for `softmax-one compile` (TPU programs built on a CPU host): jax's own tpu
        # extra pins the libtpu that matches the installed jax.
        "tpu-aot": ["jax[tpu]>=0.10"],
        # CI pins torch==2.13.0 before installing this extra (a CPU build; see .ci/run).
        "hf": ["torch>=2.4", "transformers>=4.45", "safetensors>=0.4"],
    },
    entry_points={"console_scripts": ["softmax-one=softmax_one_jax.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
