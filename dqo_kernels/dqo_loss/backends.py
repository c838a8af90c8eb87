"""The loss's backend table: backend name -> the module that implements the launcher
signature of :mod:`.launch` (``dqo_loss_forward``)."""
from __future__ import annotations

from types import ModuleType

from . import naive


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` (resolved): ``triton``, ``cpp``, else the definition."""
    if name == "triton":
        from . import triton
        return triton
    if name == "cpp":
        from . import cpp
        return cpp
    return naive
