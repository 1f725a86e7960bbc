import re

import pandas as pd
import pytest

from vqa.data import DataError
from vqa.submission import SubmissionError, submission_order, validate_submission, write_submission


def test_writes_every_id_once_in_order(tmp_path):
    path = tmp_path / "submission.csv"
    frame = write_submission(path, {"x": "a", "y": "d", "z": "b"}, ["z", "x", "y"])
    assert list(frame["id"]) == ["z", "x", "y"]
    assert path.read_text() == "id,answer\nz,b\nx,a\ny,d\n"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("answers, message", [
    ({"x": "a"}, "1 test id(s) missing, first 'y'"),
    ({"x": "a", "y": "e"}, "answer 'e' is not one of a, b, c, d"),
    ({"x": "a", "y": "A"}, "answer 'A' is not one of"),
])
def test_incomplete_or_invalid_submission_is_refused(tmp_path, answers, message):
    path = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=re.escape(message)):
        write_submission(path, answers, ["x", "y"])
    assert not path.exists()


def test_validation_catches_duplicates_and_strangers():
    with pytest.raises(SubmissionError, match=re.escape("1 duplicate id(s)")):
        validate_submission(pd.DataFrame({"id": ["x", "x"], "answer": ["a", "b"]}), ["x"])
    with pytest.raises(SubmissionError, match="not in test.csv, first 'q'"):
        validate_submission(pd.DataFrame({"id": ["x", "q"], "answer": ["a", "b"]}), ["x"])


def test_sample_submission_fixes_the_order(tmp_path):
    test = pd.DataFrame({"id": ["1", "2", "3"]})
    assert submission_order(test, tmp_path) == ["1", "2", "3"]
    pd.DataFrame({"id": ["3", "1", "2"], "answer": "a"}).to_csv(tmp_path / "sample_submission.csv",
                                                              index=False)
    assert submission_order(test, tmp_path) == ["3", "1", "2"]
    pd.DataFrame({"id": ["3", "1"], "answer": "a"}).to_csv(tmp_path / "sample_submission.csv",
                                                         index=False)
    with pytest.raises(DataError, match="ids differ from test.csv"):
        submission_order(test, tmp_path)
