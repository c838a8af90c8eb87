"""One declaration per option: a dataclass field whose metadata carries its help, its choices
and its bounds, checked when the object is built.

    @dataclass
    class LossConfig(Options):
        beta: float = opt(0.1, "KL coefficient", gt=0, lt=math.inf)

The API (``LossConfig(beta=-1)``), a YAML file and the command line all go through the same
``__post_init__``: a value out of range is a :class:`~dqo.errors.UsageError` that names the
option, before any work. :mod:`dqo.cli` builds every command line from these fields.
"""
import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from .errors import UsageError

# metadata keys that are argparse's own; the others (bounds, required) are ours
ARGPARSE_KEYS = ("help", "choices", "metavar")
OWN_KEYS = ("bounds", "required")


class FieldMetadata(Mapping):
    """A field's metadata: argparse's keys, the only ones iterating it shows, and ours
    (bounds, required), which a lookup finds too. ``HfArgumentParser`` passes every key it
    sees to ``add_argument``, so it takes these dataclasses as they are, as TRL's scripts
    use it (``HfArgumentParser((ScriptArguments, DQOConfig))``); the bounds are checked when
    the dataclass is built."""

    def __init__(self, meta: Dict[str, Any]):
        self._meta = dict(meta)

    def __getitem__(self, key):
        return self._meta[key]

    def __iter__(self):
        return (k for k in self._meta if k in ARGPARSE_KEYS)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def all_metadata(f: dataclasses.Field) -> Dict[str, Any]:
    """Every key of a field's metadata, ours (:data:`OWN_KEYS`) included."""
    return {k: f.metadata[k] for k in (*ARGPARSE_KEYS, *OWN_KEYS) if k in f.metadata}


def opt(default: Any, help: str, *, choices: Optional[Sequence] = None,
        ge: Optional[float] = None, gt: Optional[float] = None,
        le: Optional[float] = None, lt: Optional[float] = None,
        required: bool = False, metavar: Optional[str] = None):
    """A dataclass field declared with everything a user sees of it: its default, help,
    choices, bounds (``ge``/``gt`` below, ``le``/``lt`` above; an end not given is infinity,
    excluded; an ``int`` field must also be an integer) and whether a command line requires
    it (``required``: None is refused there)."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("opt: give at most one lower (ge, gt) and one upper (le, lt) bound")
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if metavar is not None:
        meta["metavar"] = metavar
    if (ge, gt, le, lt) != (None,) * 4:
        meta["bounds"] = (ge if gt is None else gt, le if lt is None else lt,
                          gt is not None, lt is not None)
    if required:
        meta["required"] = True
    return field(default=default, metadata=FieldMetadata(meta))


def flag(name: str) -> str:
    """The command-line spelling of a field: ``is_clip`` -> ``--is-clip``."""
    return "--" + name.replace("_", "-")


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


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # resolved once per class, not once per field and object


def field_type(cls, name: str):
    """The field's type with ``Optional`` taken off (``Optional[int]`` -> ``int``)."""
    hint = _hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def check_field(obj, f: dataclasses.Field) -> None:
    """One field's value against its declaration: type, choices, bounds."""
    value, name = getattr(obj, f.name), flag(f.name)
    if value is None:
        if f.default is not None and not f.metadata.get("required"):
            raise UsageError(f"{name}: expected a value, got None")
        return
    typ = field_type(type(obj), f.name)
    if typ is bool and not isinstance(value, bool):
        raise UsageError(f"{name}: expected true or false, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise UsageError(f"{name}: expected a string, got {value!r}")
    if typ in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UsageError(f"{name}: expected a number, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UsageError(f"{name}: expected one of {', '.join(map(str, choices))}, got "
                         f"{value!r}")
    low, high, low_open, high_open = f.metadata.get("bounds", (None, None, True, True))
    if typ in (int, float) and (low is not None or high is not None or typ is int):
        # an end not given is infinity, excluded: an upper bound of inf allowed is ``le=inf``
        check_range(name, value, -math.inf if low is None else low,
                    math.inf if high is None else high, low_open=low_open or low is None,
                    high_open=high_open or high is None, integer=typ is int)


@dataclass
class Options:
    """Base of every options dataclass: its fields are checked when it is built, then
    ``check()`` (cooperative: each section adds its cross-field rules and calls super)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field(self, f)
        self.check()

    def check(self) -> None:
        """Rules between fields; a section that has some overrides this and calls super."""

    def section(self, cls):
        """This object's fields of the section ``cls`` (a base class of its type), as a
        ``cls``: e.g. ``train_config.section(DQOLossConfig)``."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


def to_dict(obj) -> Dict[str, Any]:
    """Every field's value, for ``config.yaml`` and checkpoints."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
