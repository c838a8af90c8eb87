"""Offline data: rows of a data file -> tokenized examples -> padded ``[B, T]`` batches.

- :mod:`dqo.data.schema`: the row format (its fields, :func:`check_row`, :class:`Example`);
- :mod:`dqo.data.io`: reading data and prompt files (jsonl, json, parquet, csv, ``datasets``),
  writing jsonl;
- :mod:`dqo.data.tokenize`: rows -> examples (per-token rewards, behaviour log-probs, what
  unfinished responses become);
- :mod:`dqo.data.collate`: examples -> :class:`Batch`, and the ``transformers.Trainer`` view of
  them (:func:`trainer_rows`, which ``dqo.hf.DQOCollator`` batches).
"""
from ..errors import DataError
from .collate import Batch, collate, collate_trainer_rows, trainer_row, trainer_rows
from .io import (
    ANSWER_COLUMNS,
    PROMPT_COLUMNS,
    TABLE_FORMATS,
    prompt_row,
    read_jsonl,
    read_prompt_rows,
    read_prompts,
    read_solutions,
    sft_rows,
    write_jsonl,
)
from .schema import RESERVED, Example, check_row, extra_columns, response_row
from .tokenize import (
    TRUNCATED_POLICIES,
    apply_truncated_policy,
    split_steps,
    step_end_tokens,
    tokenize_row,
    tokenize_rows,
)

__all__ = [
    "ANSWER_COLUMNS", "Batch", "DataError", "Example", "PROMPT_COLUMNS", "RESERVED",
    "TABLE_FORMATS", "TRUNCATED_POLICIES", "apply_truncated_policy", "check_row", "collate",
    "collate_trainer_rows", "extra_columns", "prompt_row", "read_jsonl", "read_prompt_rows",
    "read_prompts", "read_solutions", "response_row", "sft_rows", "split_steps",
    "step_end_tokens", "tokenize_row", "tokenize_rows", "trainer_row", "trainer_rows",
    "write_jsonl",
]
