from setuptools import find_packages, setup

setup(
    name="gptfast",
    version="0.1.0",
    description="A lean GPT-2-class trainer whose hot paths are Triton kernels, for one consumer GPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gptfast", "gptfast.*", "kernels", "kernels.*"]),
    python_requires=">=3.11",  # tomllib
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "tiktoken>=0.6",
        "numpy>=1.24",
        "nvidia-ml-py>=12.0",
        "safetensors>=0.4",
    ],
    extras_require={
        # pytest-xdist: the suite on every core (`pytest -n 2`); the benchmarks run without it
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "pytest-xdist>=3"],
        # transformers: to load an exported checkpoint there (the tests check that it loads)
        # <5.25: transformers 5.25 requires Hugging Face's `kernels` distribution, whose top-level
        # package `kernels` collides with ours (transformers then imports ours and fails; or theirs
        # shadows ours). gptfast/__init__.py names the collision if it happens anyway.
        "hf": ["transformers>=4.40,<5.25"],
        # [log] backends
        "tensorboard": ["tensorboard>=2.12"],
        "wandb": ["wandb>=0.16"],
        # python -m gptfast.plot
        "plot": ["matplotlib>=3.7"],
        # the peer kernel libraries the benchmarks race against
        # torchao: float8's Float8Linear (tensorwise), which tests/test_fp8.py holds gptfast.fp8 to and
        # bench/bench_fp8.py times beside it; a peer, not a dependency (docs/kernels.md says why)
        "peers": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1", "torchao>=0.13"],
    },
)
