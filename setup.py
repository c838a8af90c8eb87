"""dqo-kernels: fused kernels and a trainer for Direct Q-function Optimization.

The native CPU kernel (csrc/) ships as source inside the package (``dqo_kernels/csrc``) and is
compiled against the installed torch on first use, so the package never needs torch at build
time and never builds against a torch other than the one it runs with.
"""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
for line in (here / "dqo_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="dqo-kernels",
    version=version["__version__"],
    description="Fused kernels and a DeepSpeed trainer for Direct Q-function Optimization (DQO)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["dqo_kernels", "dqo_kernels.csrc", "dqo", "dqo.tasks", "dqo.experiments"],
    package_dir={"dqo_kernels.csrc": "csrc"},
    package_data={"dqo_kernels.csrc": ["*.cpp", "*.h"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # the trainer (python -m dqo.train); flash-attn is used on GPU when installed
        "train": ["transformers>=4.56", "deepspeed>=0.16", "math-verify>=0.7", "tqdm"],
        "experiments": ["matplotlib"],  # python -m dqo.experiments.replicate
        # ruff pinned: a new release may add rules and fail CI on unchanged code
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "ruff==0.17.6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
