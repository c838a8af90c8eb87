"""dqo-kernels: fused kernels and a trainer for Direct Q-function Optimization.

The native CPU ops (csrc/) are compiled here, at install, into ``dqo_kernels._C_torch<version>_
<isa>`` when torch is importable in the build environment, i.e. with torch installed first and
``pip install --no-build-isolation``. torch is deliberately not a build requirement: pip's
isolated build would download a second, multi-GB torch, maybe not the one we run with. Without
torch here the extension is skipped, and the sources, shipped in the package
(``dqo_kernels/csrc``), are compiled on first use instead (dqo_kernels/native.py).

The module is built for AVX2 when this machine has it, and its name says so: at run time it is
loaded only by a torch of the same version on a CPU with AVX2, anything else builds its own.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
for line in (here / "dqo_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)


def native_extension():
    """(ext_modules, cmdclass) for the prebuilt native ops, or empty ones without torch."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("dqo-kernels: torch is not importable in this build environment (pip's build "
              "isolation?): the native CPU ops are not prebuilt and will be compiled on first "
              "use. Install torch first, then this package with --no-build-isolation.",
              file=sys.stderr)
        return [], {}
    # native.py by path, not `import dqo_kernels`, whose __init__ imports the whole package
    spec = importlib.util.spec_from_file_location("_dqo_native", here / "dqo_kernels" / "native.py")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    ext = CppExtension(
        name=f"dqo_kernels.{native.prebuilt_module_name()}",
        sources=[f"csrc/{s}" for s in native.SOURCES],
        depends=[f"csrc/{s}" for s in native.INCLUDED],  # included by the one source
        include_dirs=[str(here / "csrc")],
        extra_compile_args=[*native.CFLAGS, *native.isa_flags()],
        extra_link_args=list(native.LDFLAGS),
        optional=True,  # no compiler: install anyway; the JIT path then warns and falls back
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extension()

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
    package_data={"dqo_kernels.csrc": ["*.cpp", "*.h"]},  # for the JIT build
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
