"""dqo-kernels: fused kernels and a trainer for Direct Q-function Optimization.

The native CPU ops (csrc/: plain C++ behind a C interface, no torch headers) are compiled here,
at install, into ``dqo_kernels/_native_<isa>_<digest>...so``, with the same compiler command as
the build on first use (dqo_kernels/_native/build.py). That needs a C++ compiler, not torch, so
it works under pip's build isolation too. Without a compiler the install goes on and the ops are
built on first use (or PyTorch runs them, with a warning).
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

here = Path(__file__).parent
version = {}
for line in (here / "dqo_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

# _native/build.py by path, not `import dqo_kernels`, whose __init__ imports torch
_spec = importlib.util.spec_from_file_location("_dqo_native_build",
                                               here / "dqo_kernels" / "_native" / "build.py")
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)


class BuildNative(build_ext):
    """Builds the one native library with native.build (atomic; its name carries the digest)."""

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            native.build(out, src=here / "csrc", verbose=self.verbose > 1)
        except native.NativeBuildError as exc:
            print(f"dqo-kernels: the native CPU ops were not prebuilt ({exc}); they will be "
                  "compiled on first use", file=sys.stderr)


def native_extension():
    stem = native.library_stem(src=here / "csrc")
    ext = Extension(f"dqo_kernels.{stem}", sources=[f"csrc/{s}" for s in native.SOURCES],
                    depends=[f"csrc/{s}" for s in native.INCLUDED])
    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = native_extension()

setup(
    name="dqo-kernels",
    version=version["__version__"],
    description="Fused kernels and a DeepSpeed trainer for Direct Q-function Optimization (DQO)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["dqo_kernels", "dqo_kernels._native", "dqo_kernels.dqo_loss",
              "dqo_kernels.logprobs", "dqo_kernels.csrc", "dqo", "dqo.tasks", "dqo.experiments"],
    package_dir={"dqo_kernels.csrc": "csrc"},
    package_data={"dqo_kernels.csrc": ["*.cpp", "*.h"]},  # for the JIT build
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # the trainer (python -m dqo.train); flash-attn is used on GPU when installed
        # matplotlib: the curves every run draws (dqo.plot); accelerate: dqo.hf's Trainer
        # datasets: prompts and data in the Hub's formats (json, parquet, csv, saved dirs)
        "train": ["transformers>=4.56", "deepspeed>=0.16", "math-verify>=0.7", "tqdm",
                  "matplotlib", "accelerate>=1.0", "datasets"],
        "experiments": ["matplotlib"],  # python -m dqo.experiments.replicate
        "lora": ["peft>=0.13"],  # --lora-r: LoRA adapters, the value model on a shared base
        "tracking": ["tensorboard", "wandb"],  # --report-to tensorboard|wandb
        "vllm": ["vllm"],  # dqo.sample --engine vllm (GPU)
        # ruff pinned: a new release may add rules and fail CI on unchanged code
        # tensorboard: the --report-to test reads its events file back; peft: the LoRA tests
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "ruff==0.17.6",
                 "tensorboard", "peft>=0.13"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
