"""Writing and validating submission.csv: every test id exactly once, every answer in a-d."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from vqa.data import LETTERS, DataError
from vqa.io import write_text_atomic


class SubmissionError(ValueError):
    """The submission would be incomplete or invalid."""


def submission_order(test: pd.DataFrame, data_dir: Path) -> list[str]:
    """The id order: sample_submission.csv's when present (and matching test.csv), else
    test.csv's."""
    sample_path = Path(data_dir) / "sample_submission.csv"
    test_ids = list(test["id"])
    if not sample_path.is_file():
        return test_ids
    sample = pd.read_csv(sample_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if "id" not in sample.columns:
        raise DataError(f"{sample_path}: missing column id")
    sample_ids = [s.strip() for s in sample["id"]]
    if sorted(sample_ids) != sorted(test_ids):
        only_sample = sorted(set(sample_ids) - set(test_ids))[:3]
        only_test = sorted(set(test_ids) - set(sample_ids))[:3]
        raise DataError(f"{sample_path}: ids differ from test.csv (only in sample: {only_sample}, "
                        f"only in test: {only_test})")
    return sample_ids


def validate_submission(frame: pd.DataFrame, expected_ids: list[str]) -> None:
    """Raises SubmissionError unless `frame` has exactly the expected ids once each, answers a-d."""
    if list(frame.columns) != ["id", "answer"]:
        raise SubmissionError(f"columns are {list(frame.columns)}, expected ['id', 'answer']")
    ids = list(frame["id"])
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicates:
        raise SubmissionError(f"{len(duplicates)} duplicate id(s), first {duplicates[0]!r}")
    missing = sorted(set(expected_ids) - set(ids))
    if missing:
        raise SubmissionError(f"{len(missing)} test id(s) missing, first {missing[0]!r}")
    extra = sorted(set(ids) - set(expected_ids))
    if extra:
        raise SubmissionError(f"{len(extra)} id(s) not in test.csv, first {extra[0]!r}")
    bad = frame[~frame["answer"].isin(LETTERS)]
    if not bad.empty:
        raise SubmissionError(f"id {bad.iloc[0]['id']!r}: answer {bad.iloc[0]['answer']!r} "
                              f"is not one of a, b, c, d")


def write_submission(path: Path, answers: dict[str, str], order: list[str]) -> pd.DataFrame:
    """Validates, then writes atomically: a half-written submission.csv never exists."""
    unanswered = [i for i in order if i not in answers]
    if unanswered:
        raise SubmissionError(f"{len(unanswered)} test id(s) missing, first {unanswered[0]!r}")
    frame = pd.DataFrame({"id": order, "answer": [answers[i] for i in order]})
    validate_submission(frame, order)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    write_text_atomic(path, buffer.getvalue())
    return frame
