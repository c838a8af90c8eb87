"""Datasets the way users have them: jsonl, json, parquet, csv and saved datasets directories,
GSM8K's and MATH's columns, read with the datasets library."""
import json

import pytest

from dqo import data as D
from dqo.cli import UsageError, check_data

datasets = pytest.importorskip("datasets")

GSM8K = [{"question": "Natalia sold 48 clips in April and half as many in May. How many?",
          "answer": "In May: 48/2 = 24.\nIn all: 48+24 = 72.\n#### 72"},
         {"question": "Weng earns $12 an hour. How much for 50 minutes?",
          "answer": "12/60 = 0.2 a minute.\n0.2*50 = 10.\n#### 10"}]
MATH = [{"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "level": 1}]


def test_gsm8k_parquet_and_math_csv_columns(tmp_path):
    datasets.Dataset.from_list(GSM8K).to_parquet(str(tmp_path / "gsm8k.parquet"))
    rows = D.read_prompt_rows(tmp_path / "gsm8k.parquet")
    assert [(r["prompt"], r["answer"]) for r in rows] == [(g["question"], a) for g, a in
                                                          zip(GSM8K, ("72", "10"))]
    assert [r["solution"] for r in rows] == [g["answer"] for g in GSM8K]  # SFT's solutions
    datasets.Dataset.from_list(MATH).to_csv(str(tmp_path / "math.csv"))
    (row,) = D.read_prompt_rows(tmp_path / "math.csv")
    assert (row["prompt"], row["answer"], row["solution"], row["level"]) == (
        MATH[0]["problem"], "2", MATH[0]["solution"], 1)  # other columns ride along


def test_named_columns_json_and_a_saved_directory(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps([{"q": "2+2?", "gold": "4", "tag": "x"}]))
    (row,) = D.read_prompt_rows(tmp_path / "q.json", prompt_column="q", answer_column="gold")
    assert row == {"prompt": "2+2?", "answer": "4", "tag": "x"}
    with pytest.raises(D.DataError, match=r"q.json:row 1: no prompt column \(prompt, question, "
                                          r"problem\); found \['gold', 'q', 'tag'\]"):
        D.read_prompt_rows(tmp_path / "q.json")
    train_rows = [{"prompt": "Q", "response": "#### 4", "reward": 1.0},
                  {"prompt": "Q", "response": "#### 5", "reward": 0.0}]
    datasets.Dataset.from_list(train_rows).save_to_disk(str(tmp_path / "saved"))
    check_data("--data", str(tmp_path / "saved"))
    rows, errors = D.read_jsonl(tmp_path / "saved")
    assert [(r["response"], r["reward"]) for r in rows] == [("#### 4", 1.0), ("#### 5", 0.0)]
    assert not errors and rows[0]["_source"] == f"{tmp_path / 'saved'}:row 1"


def test_bad_data_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir").mkdir()
    for path, message in ((tmp_path / "notes.txt", "expected a .jsonl, .json, .parquet, .csv file"),
                          (tmp_path / "dir", "is a directory but not a saved datasets one"),
                          (tmp_path / "none.parquet", "no such file or directory")):
        with pytest.raises(UsageError, match=message):
            check_data("--data", str(path))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(D.DataError, match=r"broken.parquet: not readable as parquet"):
        D.read_prompt_rows(tmp_path / "broken.parquet")
