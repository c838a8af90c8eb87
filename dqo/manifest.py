"""Digests of saved artifacts, checked when they are read back: a flipped bit or a cut file in a
checkpoint, a ``final/`` model or the reference log-prob cache is an error that names the
file, never a run that goes on with wrong numbers.

A manifest is ``MANIFEST.sha256`` in ``sha256sum`` format (``<hex>  <relative path>`` a line),
so ``cd DIR && sha256sum -c MANIFEST.sha256`` checks a directory by hand too. It is written
after the files it lists and before the directory is renamed into place, so a complete
directory always has one. A directory written before manifests existed has none: it loads
with a one-line warning.

:func:`check_weights` is the second net, for what no manifest covers (a model from elsewhere,
or a flip before the manifest was written): non-finite or absurdly large weights.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from .atomic import atomic_write
from .errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.sha256"
# |w| above this in a floating-point weight is a damaged file, not a trained model: trained
# transformer weights stay within a few hundred; an exponent bit flip gives 1e19 and more
WEIGHT_LIMIT = 1e4
_CHUNK = 1 << 20


def file_digest(path, fsync: bool = False) -> str:
    """The sha256 of a file, read in 1 MiB chunks (a multi-GB safetensors file never sits in
    memory whole); ``fsync``: and its data flushed to the disk first (what savers such as
    ``torch.save`` and ``save_pretrained`` leave undone), so that the rename that publishes
    the directory never precedes the data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _listed(directory: Path, name: str) -> Iterable[str]:
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not p.is_symlink() and rel != name and not p.name.startswith("."):
            yield rel


def write_manifest(directory, files: Optional[Iterable[str]] = None,
                   name: str = MANIFEST) -> Path:
    """Write ``directory/name`` listing the sha256 of ``files`` (paths relative to
    ``directory``; default every regular file below it but hidden ones), atomically."""
    directory = Path(directory)
    files = list(_listed(directory, name) if files is None else files)
    lines = "".join(f"{file_digest(directory / rel, fsync=True)}  {rel}\n" for rel in files)
    path = directory / name
    atomic_write(path, lambda f: f.write(lines))
    return path


def digest_line(data: bytes, rel: str) -> str:
    """A manifest line for bytes about to be written to ``rel``."""
    return f"{hashlib.sha256(data).hexdigest()}  {rel}\n"


def read_manifest(path) -> Dict[str, str]:
    """relative path -> sha256 of a manifest file; an unreadable line is a CheckpointError."""
    entries = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"{path}:{i}: not a '<sha256>  <path>' line: {line[:80]!r}")
        entries[rel.lstrip("*")] = digest  # '*' marks binary mode in sha256sum's format
    return entries


def find_damage(directory, name: str = MANIFEST) -> Tuple[Optional[bool], Optional[str]]:
    """(None, None) if ``directory`` has no manifest; (True, None) if every file it lists is
    there with its digest; (False, why) naming the first that is not."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        return None, None
    for rel, digest in read_manifest(path).items():
        f = directory / rel
        if not f.is_file():
            return False, f"{f}: missing (listed in {path})"
        actual = file_digest(f)
        if actual != digest:
            return False, (f"{f}: sha256 {actual[:16]}..., {path} says {digest[:16]}... (the "
                           f"file changed after it was written: a flipped bit, a cut copy)")
    return True, None


def verify(directory, what: str = "", name: str = MANIFEST, *, missing: str = "warn",
           hint: Callable[[], str] = lambda: "") -> bool:
    """Check ``directory`` against its manifest; a damaged file is a :class:`CheckpointError`
    naming it (and ``hint()``: what to do instead). Without a manifest: ``missing`` says how
    loudly to say so (``warn``, ``info``), and False is returned."""
    ok, why = find_damage(directory, name)
    if ok is None:
        getattr(log, "warning" if missing == "warn" else "info")(
            "%s%s has no %s (written before manifests existed?): not checked for damage",
            f"{what} " if what else "", directory, name)
        return False
    if not ok:
        advice = hint()
        raise CheckpointError(f"{what + ': ' if what else ''}{why}"
                              f"{'; ' + advice if advice else ''}")
    return True


def last_intact_checkpoint(root, exclude=None) -> Optional[Path]:
    """The newest ``step-*`` directory of ``root`` (but ``exclude``) whose files match its
    manifest (or that has none, but is complete)."""
    for path in sorted((p for p in Path(root).glob("step-*") if p.is_dir()), reverse=True):
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        if (path / "trainer_state.json").is_file() and find_damage(path)[0] is not False:
            return path
    return None


def verify_checkpoint(path) -> None:
    """:func:`verify` for a checkpoint about to be resumed from; the error names the damaged
    file and the newest intact checkpoint beside it (and how to resume from that)."""
    path = Path(path)

    def hint() -> str:
        intact = last_intact_checkpoint(path.parent, exclude=path)
        if intact is None:
            return "no other intact checkpoint; start over without --resume"
        return (f"the last intact checkpoint is {intact}: to resume from it, write "
                f"'{intact.name}' into {path.parent / 'latest'}")
    verify(path, "checkpoint", hint=hint)


def written_by_dqo(directory) -> bool:
    """Whether a model directory looks like one dqo wrote (``final/<model>``, or a policy with
    its ``decoding.json``): only those are expected to carry a manifest."""
    directory = Path(directory)
    return directory.parent.name == "final" or (directory / "decoding.json").is_file()


def verify_model_dir(path) -> None:
    """:func:`verify` for a model directory about to be loaded (``--model``); a hub id or a
    directory that another tool wrote is not expected to have a manifest."""
    if os.path.isdir(path):
        verify(path, "model", missing="warn" if written_by_dqo(path) else "info",
               hint=lambda: f"if you edited it on purpose, delete {Path(path) / MANIFEST}")


def check_weights(named: Iterable[Tuple[str, torch.Tensor]], where, *,
                  limit: float = WEIGHT_LIMIT) -> None:
    """Refuse non-finite weights, or floating-point weights beyond ``limit`` in magnitude, with
    a :class:`CheckpointError` naming ``where`` (the file or directory) and the tensor."""
    for name, t in named:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = t.detach().abs().amax().item()  # NaN propagates: `not peak <= limit` sees it
        if not peak <= limit:
            kind = "non-finite values" if peak != peak or peak == float("inf") else (
                f"a weight of magnitude {peak:.3g} (more than {limit:g})")
            raise CheckpointError(f"{where}: tensor {name} holds {kind}: the file is damaged "
                                  f"(a flipped bit?) or is not a trained model")
