"""What every command line does with a user's mistake: one line that names the flag, file or
row and what was expected, exit code 2, no traceback (``DQO_DEBUG=1`` shows it). Arguments are
checked when they are parsed, before any work."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import CheckpointError
from .data import DataError


class UsageError(ValueError):
    """A user's mistake: a value out of range, a missing file, too many bad rows."""


USER_ERRORS = (UsageError, DataError, CheckpointError)


def run(main: Callable, argv=None, prog: str = "dqo"):
    """``main(argv)``, with a user error turned into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if os.environ.get("DQO_DEBUG", "0") == "1":
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_range(flag: str, value, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """``value`` within [low, high] (``*_open``: that end excluded); NaN never is."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if integer:
        ok = ok and float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        kind = "an integer" if integer else "a value"
        raise UsageError(f"{flag}: expected {kind} in {lo}{low}, {high}{hi}, got {value!r}")


def check_file(flag: str, value: Optional[str]) -> None:
    if value is None:
        return
    p = Path(value).expanduser()
    if not p.exists():
        raise UsageError(f"{flag}: no such file: {value}")
    if p.is_dir():
        raise UsageError(f"{flag}: expected a file, got the directory {value}")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def check_data(flag: str, value: Optional[str]) -> None:
    """A data file in a format we read, or a directory ``datasets`` saved (save_to_disk)."""
    if value is None:
        return
    p = Path(value).expanduser()
    if not p.exists():
        raise UsageError(f"{flag}: no such file or directory: {value}")
    if p.is_dir():
        if not any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json",
                                               "state.json")):
            raise UsageError(f"{flag}: {value} is a directory but not a saved datasets one "
                             f"(save_to_disk)")
    elif p.suffix not in DATA_SUFFIXES:
        raise UsageError(f"{flag}: expected a {', '.join(DATA_SUFFIXES)} file or a saved "
                         f"datasets directory, got {value}")


def check_model(flag: str, value: Optional[str]) -> None:
    """A model directory that exists, or a Hugging Face Hub id (``org/name``): anything else
    cannot be a model, and transformers would only say "Repo id must use alphanumeric chars"."""
    if value is None:
        return
    p = Path(value).expanduser()
    if p.is_dir():
        return
    if p.exists():
        raise UsageError(f"{flag}: expected a model directory, got the file {value}")
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - transformers always brings it
        raise UsageError(f"{flag}: no such model directory: {value}") from None
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(f"{flag}: no such model directory: {value} (nor is it a Hugging Face "
                         f"Hub id like org/name)") from None
