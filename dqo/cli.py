"""What every command line shares: its parser, built from the options dataclasses
(:mod:`dqo.configs`) with ``--config run.yaml`` and command-line overrides; and what it does
with a user's mistake: one line that names the flag, file or row and what was expected, exit
code 2, no traceback (``DQO_DEBUG=1`` shows it). Arguments are checked when they are parsed,
before any work."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Optional, Sequence

from .errors import USER_ERRORS, UsageError
from .options import ARGPARSE_KEYS, field_type, flag, to_dict


def run(main: Callable, argv=None, prog: str = "dqo", interrupted: str = ""):
    """``main(argv)``, with a user error turned into one line on stderr and exit code 2, and
    Ctrl-C (SIGINT) into one line (``prog: interrupted; <interrupted>``) and exit code 130,
    the shell's code for it."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if os.environ.get("DQO_DEBUG", "0") == "1":
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("DQO_DEBUG", "0") == "1":
            raise
        print(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""),
              file=sys.stderr)
        raise SystemExit(130) from None


def configure_logging(fmt: str = "%(asctime)s %(name)s %(message)s") -> None:
    """Log lines on stderr: INFO on rank 0, WARNING and worse on the other ranks, so that a run
    of N processes prints each line once (the launchers set ``RANK`` before any process group
    exists)."""
    import logging
    logging.basicConfig(format=fmt, datefmt="%H:%M:%S")
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.getLogger().setLevel(logging.INFO if rank0 else logging.WARNING)


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


class _DashedOnly:
    """The parser (or group) as ``HfArgumentParser`` sees it, minus the ``--snake_case``
    spelling it adds beside ``--kebab-case``: one flag per option, as our users type them."""

    def __init__(self, parser):
        self.parser = parser

    def add_argument(self, *names, **kwargs):
        dashed = [n for n in names if "_" not in n or not n.startswith("--")]
        if kwargs.get("action") == "store_false":  # the --no-x complement of a switch
            kwargs["help"] = f"turn --{dashed[0][len('--no-'):]} off"
        return self.parser.add_argument(*(dashed or names), **kwargs)


def option_parser(sections: Sequence[type], **kwargs) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    class OptionParser(HfArgumentParser):
        """``HfArgumentParser`` over our fields: only argparse's keys of their metadata (the
        bounds are checked by the dataclass), the default in the help, and every default
        suppressed, so that the parse says which options were given."""

        @staticmethod
        def _parse_dataclass_field(parser, field):
            f = copy.copy(field)
            meta = {k: v for k, v in field.metadata.items() if k in ARGPARSE_KEYS}
            if field.default is not None and field.default is not dataclasses.MISSING:
                meta["help"] = f"{meta.get('help', '')} (default: {field.default})"
            f.metadata = MappingProxyType(meta)
            HfArgumentParser._parse_dataclass_field(_DashedOnly(parser), f)

    p = OptionParser(sections, formatter_class=_HelpFormatter, **kwargs)
    for action in p._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return p


def read_config_file(path: str, cls) -> Dict[str, Any]:
    """The options of a YAML (or JSON) file, by field name (``is_clip`` or ``is-clip``); an
    unknown key or a value of the wrong type is a UsageError naming it."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config: {path} is not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config: {path}: expected a mapping of options, got "
                         f"{type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UsageError(f"--config: {path}: unknown option {key!r} (expected one of "
                             f"{', '.join(sorted(names))})")
        typ = field_type(cls, name)
        if isinstance(value, str) and typ in (int, float):  # YAML 1.1 reads 1e-5 as a string
            try:
                value = typ(value)
            except ValueError:
                raise UsageError(f"{flag(name)}: expected a number, got {value!r} (in {path})"
                                 ) from None
        out[name] = value
    return out


def parse_config(cls, sections: Sequence[type], argv=None, *, prog: str,
                 description: Optional[str] = None,
                 preset: Optional[Callable[[Dict], Dict]] = None,
                 epilog: Optional[str] = None):
    """``cls`` (a config composed of ``sections``) from the command line: its defaults, then
    ``preset(given)`` (the values a named preset sets, for the options given so far), then the
    ``--config`` file's, then the flags given. Checked before any work: an out-of-range value,
    wherever it came from, is a UsageError naming its option."""
    p = option_parser(sections, prog=prog, description=description, epilog=epilog)
    p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                   help="options from a YAML file (keys: the options' names, e.g. is_clip: inf);"
                        " flags given beside it override it")
    # the DeepSpeed launcher appends --local_rank=N to every process's command line; its
    # environment's LOCAL_RANK says the same, and is what dqo reads
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    given = vars(p.parse_args(argv))
    given.pop("local_rank", None)
    config = given.pop("config", None)
    values = read_config_file(config, cls) if config else {}
    values.update(given)
    values = {**(preset(values) if preset else {}), **values}
    try:
        cfg = cls(**values)
    except TypeError as exc:  # pragma: no cover - every key is a field
        raise UsageError(str(exc)) from None
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) is None:
            raise UsageError(f"{flag(f.name)}: required (on the command line or in --config)")
    return cfg


def write_config(cfg, path) -> None:
    """The full resolved config as YAML (``RUN_DIR/config.yaml``): ``--config`` reads it back."""
    import yaml

    from .atomic import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda f: f.write(text))
