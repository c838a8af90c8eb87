"""Reading and writing data files: the rows of :mod:`dqo.data.schema` in jsonl (line by line: a
bad line is one bad row, reported with its line number), and prompt or data rows in the formats
of the Hub (json, parquet, csv, a saved ``datasets`` directory)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..atomic import atomic_write
from ..errors import DataError
from ..prompts import check_prompt, prompt_key
from .schema import check_row

log = logging.getLogger(__name__)


def _lines(path) -> Iterator[Tuple[str, object]]:
    """``("path:lineno", line)`` for every non-blank line of a jsonl file; a line that is not
    UTF-8 comes as a DataError in place of its text (one bad line, not a bad file)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield where, line


def _parse(where: str, line):
    if isinstance(line, DataError):
        raise line
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None


TABLE_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _table_rows(path) -> Iterator[Tuple[str, object]]:
    """``("path:row N", row)`` of a json, parquet or csv file or a saved ``datasets``
    directory, read with the ``datasets`` library (the formats of the Hub)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading anything but jsonl needs the datasets package "
                        f"(pip install datasets)") from None
    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):  # a saved DatasetDict: its train split
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; save the split "
                                f"to use alone")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif p.suffix in TABLE_FORMATS:
        try:
            ds = datasets.load_dataset(TABLE_FORMATS[p.suffix], data_files=str(p),
                                       split="train")
        except Exception as exc:  # a malformed file: one error that names it
            raise DataError(f"{path}: not readable as {TABLE_FORMATS[p.suffix]} "
                            f"({type(exc).__name__}: {exc})") from None
    else:
        raise DataError(f"{path}: expected a .jsonl, .json, .parquet or .csv file or a saved "
                        f"datasets directory")
    for i, row in enumerate(ds, 1):
        yield f"{path}:row {i}", dict(row)


def _records(path) -> Iterator[Tuple[str, object]]:
    """``(where, object or the DataError of its line)`` of a data file in any format: jsonl
    line by line (a bad line is one bad row), the others with ``datasets``."""
    if Path(path).is_file() and Path(path).suffix == ".jsonl":
        for where, line in _lines(path):
            try:
                yield where, _parse(where, line)
            except DataError as e:
                yield where, e
    else:
        yield from _table_rows(path)


def read_jsonl(path, *, strict: bool = False) -> Tuple[List[Dict], List[str]]:
    """Rows of a data file (jsonl, json, parquet, csv or a saved ``datasets`` directory) and
    the errors of the rows that were skipped."""
    rows, errors = [], []
    for where, obj in _records(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            rows.append(check_row(obj, where))
        except DataError as e:
            if strict:
                raise
            errors.append(str(e))
    for e in errors:
        log.warning("skipped bad row: %s", e)
    if errors:
        log.warning("%s: %d of %d rows skipped (pass strict=True / --strict-data to fail "
                    "instead)", path, len(errors), len(errors) + len(rows))
    return rows, errors


PROMPT_COLUMNS = ("prompt", "question", "problem")  # ours, GSM8K's, MATH's
ANSWER_COLUMNS = ("answer", "solution")


def prompt_row(obj: Dict, where: str, *, prompt_column: Optional[str] = None,
               answer_column: Optional[str] = None, require_answer: bool = True) -> Dict:
    """One prompt row in our fields: ``prompt`` (a non-empty string, or a conversation: a list
    of ``{"role", "content"}`` messages), ``answer``, ``solution`` (strings) and every other
    field as it is. A null or a number would be sampled as the text "None" or "42", an empty
    prompt fails inside ``generate``; either is a DataError naming the row and the column.

    Columns: ``prompt_column``, else the first of prompt, question
    (GSM8K), problem (MATH); ``answer_column``, else answer, else solution. A worked answer
    (GSM8K's, ending in ``#### N``; MATH's, with a last ``\\boxed{N}``) gives answer N and
    becomes the prompt's canonical ``solution``."""
    from ..tasks.verify import extract_hash_answer, last_boxed

    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    pc = prompt_column or next((c for c in PROMPT_COLUMNS if c in obj), None)
    if pc is None or pc not in obj:
        raise DataError(f"{where}: no prompt column ({prompt_column or ', '.join(PROMPT_COLUMNS)}"
                        f"); found {sorted(obj)}; name it with --prompt-column")
    ac = answer_column or next((c for c in ANSWER_COLUMNS if c in obj), None)
    if require_answer and (ac is None or ac not in obj or obj[ac] is None):
        raise DataError(f"{where}: no answer column ({answer_column or ', '.join(ANSWER_COLUMNS)}"
                        f"); found {sorted(obj)}; name it with --answer-column")
    prompt = obj[pc]
    if isinstance(prompt, str) and not prompt.strip():  # generate() would fail on it
        raise DataError(f"{where}: prompt column {pc!r}: expected a non-empty string or a list "
                        f"of {{role, content}} messages, got {prompt!r}")
    row = {k: v for k, v in obj.items() if k not in (pc, ac)}
    # a conversation stays one (never its Python repr); anything else is named with its row
    row["prompt"] = check_prompt(prompt, f"{where}: prompt column {pc!r}")
    if ac is not None and obj.get(ac) is not None:
        text = str(obj[ac])
        worked = extract_hash_answer(text) if "####" in text else last_boxed(text)
        if worked is not None and worked != text.strip():
            row["answer"] = worked
            row.setdefault("solution", text)
        else:
            row["answer"] = text
        if ac == "solution":  # a column named solution is one, worked answer or not
            row["solution"] = text
    if "solution" in row:
        row["solution"] = str(row["solution"])
    return row


def read_prompt_rows(path, require_answer: bool = True, *, prompt_column: Optional[str] = None,
                     answer_column: Optional[str] = None) -> List[Dict]:
    """Rows of a prompts file (jsonl, json, parquet, csv or a saved ``datasets`` directory), as
    :func:`prompt_row` reads them: ``prompt``, ``answer`` (needed by the built-in tasks'
    verifiers, optional for a user's reward function), where given ``solution`` (a worked
    canonical solution, what ``--algo sft`` trains on), and every other field as it is (a
    reward function's extra columns)."""
    rows = []
    for where, obj in _records(path):
        if isinstance(obj, DataError):
            raise obj
        rows.append(prompt_row(obj, where, prompt_column=prompt_column,
                               answer_column=answer_column, require_answer=require_answer))
    return rows


def read_prompts(path) -> Tuple[List[str], List[str]]:
    """``prompt`` and ``answer`` of every row of a prompts file (for sampling and evaluation)."""
    rows = read_prompt_rows(path)
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def read_solutions(path) -> List[Dict]:
    """An ``--sft-data`` file: rows of ``prompt`` and ``solution`` (``answer`` optional), in
    any format :func:`read_prompt_rows` reads (GSM8K's question/answer included)."""
    rows = []
    for where, obj in _records(path):
        if isinstance(obj, DataError):
            raise obj
        row = prompt_row(obj, where, require_answer=False) if isinstance(obj, dict) else obj
        if not (isinstance(row, dict) and isinstance(row.get("solution"), str)):
            raise DataError(f"{where}: expected an object with string 'prompt' and 'solution'")
        rows.append(dict(row, _source=where))
    return rows


def sft_rows(rows: Sequence[Dict], source: str) -> List[Dict]:
    """SFT's training rows: each prompt's canonical ``solution`` (once per prompt), never the
    sampled responses. A DataError if no row has a solution."""
    out, seen = [], set()
    for r in rows:
        sol = r.get("solution")
        if isinstance(sol, str) and sol and prompt_key(r["prompt"]) not in seen:
            seen.add(prompt_key(r["prompt"]))
            out.append(dict(prompt=r["prompt"], response=sol, reward=1.0,
                            answer=r.get("answer"), _source=r.get("_source", source)))
    if not out:
        raise DataError(f"{source}: no row has a 'solution': --algo sft trains on canonical "
                        f"solutions (a 'solution' field on the prompt rows, which dqo.sample "
                        f"copies into the data, or --sft-data FILE with prompt and solution), "
                        f"never on sampled responses (--algo rs trains on the correct ones)")
    return out


def row_line(row: Dict) -> str:
    """A row as one line of a jsonl file (its ``_``-prefixed bookkeeping fields left out)."""
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n"


def write_jsonl(path, rows: Iterable[Dict]) -> None:
    """Write rows atomically (a partial file is never left under ``path``)."""
    def write(f):
        for r in rows:
            f.write(row_line(r))

    atomic_write(path, write)
