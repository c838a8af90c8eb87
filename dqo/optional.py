"""Optional dependencies: a feature whose package is missing is one line that names the flag
and the pip extra that brings it (``pip install 'dqo-kernels[vllm]'``, setup.py's
``extras_require``), never an ImportError traceback from deep inside a run."""
from __future__ import annotations

import importlib

from .errors import UsageError

# import name -> (the extra of setup.py that installs it, the package to pip install alone)
EXTRAS = {"vllm": ("vllm", "vllm"), "peft": ("lora", "peft"),
          "tensorboard": ("tracking", "tensorboard"), "wandb": ("tracking", "wandb")}


def require(module: str, feature: str):
    """``import module``, or a UsageError: "``feature`` needs ``module`` (pip install
    'dqo-kernels[extra]')"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, package = EXTRAS[module]
        raise UsageError(f"{feature}: needs {module}, which is not installed ({exc}); pip "
                         f"install 'dqo-kernels[{extra}]' (or pip install {package})") from None


def check_installed(args) -> None:
    """Before any work: every optional package the options of a command ask for (``--lora-r``:
    peft, ``--report-to``: tensorboard or wandb, ``--engine vllm``: vllm) is installed."""
    if getattr(args, "lora_r", 0):
        require("peft", "--lora-r (LoRA)")
    if getattr(args, "report_to", "none") != "none":
        require(args.report_to, f"--report-to {args.report_to}")
    if getattr(args, "engine", None) == "vllm":
        require("vllm", "--engine vllm")
