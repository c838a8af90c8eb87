"""A data file written while it is produced, that survives a kill: rows are appended to
``<out>.partial/rows.jsonl`` (write, flush, fsync: each append is on disk when it returns), and
the finished file is renamed to ``<out>`` in one step, so ``<out>`` itself is only ever the
complete file. ``<out>.partial/state.json`` records what produced the rows (the options that
decide them), so that a resumed run continues only the same work.

A process killed in the middle of an append leaves a cut last line (or, after a power loss,
garbage after the last fsync): :meth:`PartialRows.open` keeps the longest prefix of complete,
parseable lines and cuts the file there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..atomic import _fsync_dir, atomic_write
from ..errors import UsageError
from .io import row_line

log = logging.getLogger(__name__)


def partial_dir(out) -> Path:
    """Where the rows of an unfinished ``out`` are kept."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class PartialRows:
    """The rows of an unfinished data file; :meth:`open` it, :meth:`append`, :meth:`finish`."""

    def __init__(self, out, state: Dict, offsets: List[int]):
        self.out, self.dir = Path(out), partial_dir(out)
        self.rows_path = self.dir / "rows.jsonl"
        self.state = state
        self._offsets = offsets  # byte offset of the end of each complete row
        self._f = open(self.rows_path, "ab")

    @property
    def n_rows(self) -> int:
        return len(self._offsets)

    @classmethod
    def open(cls, out, state: Dict, *, resume: bool, flag: str = "--resume") -> "PartialRows":
        """The partial rows of ``out``: those kept from an interrupted run with ``resume`` (its
        ``state`` must equal ``state``: a UsageError names the keys that differ), else none.
        Without ``resume``, rows left by an interrupted run are a UsageError, not discarded."""
        d = partial_dir(out)
        state = json.loads(json.dumps(state))  # as it reads back from disk
        rows_path = d / "rows.jsonl"
        if d.is_dir() and rows_path.is_file():
            offsets = _complete_lines(rows_path)
            if not resume and offsets:
                raise UsageError(f"{flag}: {d} holds {len(offsets)} rows of an interrupted run "
                                 f"for {out}; pass {flag} to continue it, or delete {d} to "
                                 f"start over")
            if resume:
                try:
                    old = json.loads((d / "state.json").read_text())
                except (OSError, ValueError):
                    old = None
                if old != state:
                    diff = sorted(k for k in set(state) | set(old or {})
                                  if (old or {}).get(k) != state.get(k))
                    raise UsageError(f"{flag}: the rows in {d} were sampled with other settings "
                                     f"(changed: {', '.join(diff) or 'state.json unreadable'}); "
                                     f"rerun with the same ones, or delete {d} to start over")
                size = rows_path.stat().st_size
                if offsets[-1:] != [size] and size:
                    log.warning("%s: dropped %d bytes after the last complete row (a process "
                                "killed mid-write)", rows_path, size - (offsets[-1] if offsets
                                                                        else 0))
                    os.truncate(rows_path, offsets[-1] if offsets else 0)
                return cls(out, state, offsets)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        atomic_write(d / "state.json", lambda f: f.write(json.dumps(state, indent=1) + "\n"))
        rows_path.touch()
        _fsync_dir(d)
        return cls(out, state, [])

    def keep(self, n: int) -> None:
        """Keep the first ``n`` rows only (a resumed run redoes what follows)."""
        if n < self.n_rows:
            self._f.flush()
            os.truncate(self.rows_path, self._offsets[n - 1] if n else 0)
            os.fsync(self._f.fileno())
            del self._offsets[n:]

    def append(self, rows: Iterable[Dict]) -> None:
        """Append ``rows``; on disk when this returns."""
        lines = [row_line(r).encode("utf-8") for r in rows]
        if not lines:
            return
        self._f.write(b"".join(lines))
        self._f.flush()
        os.fsync(self._f.fileno())
        end = self._offsets[-1] if self._offsets else 0
        for line in lines:
            end += len(line)
            self._offsets.append(end)

    def read(self) -> List[Dict]:
        """The rows kept so far."""
        self._f.flush()
        with open(self.rows_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def finish(self) -> Path:
        """Move the complete file to ``out`` (one rename) and remove the partial directory."""
        self.close()
        os.replace(self.rows_path, self.out)
        _fsync_dir(self.out.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.out

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _complete_lines(path: Path) -> List[int]:
    """End offsets of the leading lines of ``path`` that are complete JSON objects."""
    offsets: List[int] = []
    end = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                if not isinstance(json.loads(raw), dict):
                    break
            except ValueError:  # cut mid-line, or garbage after a power loss
                break
            end += len(raw)
            offsets.append(end)
    return offsets


def finished(out) -> Optional[Path]:
    """``out`` if it is complete (written, with no partial rows beside it), else None."""
    out = Path(out)
    return out if out.is_file() and not partial_dir(out).exists() else None
