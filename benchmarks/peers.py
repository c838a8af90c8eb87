"""The peers of the benchmarks: optional installs (``pip install torchrl tensordict trl
cut-cross-entropy``, or ``--no-deps`` into a directory on ``PYTHONPATH``). A peer that is missing
or fails is a row of the results with its error; each case module holds its peers' steps."""
from __future__ import annotations

# implementation name -> the module it needs
PEER_MODULES = {"torchrl": "torchrl", "trl": "trl", "cce": "cut_cross_entropy",
                "liger_ce": "liger_kernel", "liger_flce": "liger_kernel",
                "flash_attn_ce": "flash_attn"}


def peer_installed(impl: str) -> bool:
    """True for ours and torch's own implementations, else if the peer's package imports."""
    return impl not in PEER_MODULES or installed(PEER_MODULES[impl])


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False
