import pytest

from vqa.predict import accuracy, accuracy_by, parse_letter


@pytest.mark.parametrize("text, letter", [
    ("A", "a"), ("b", "b"), (" C.", "c"), ("The answer is D", "d"), ("(B) blue", "b"),
    ("정답: C", "c"), ("Answer: a) red", "a"),
])
def test_parse_letter_finds_the_option(text, letter):
    assert parse_letter(text) == letter


@pytest.mark.parametrize("text", ["", "red", "Absolutely", "E", "none of them"])
def test_parse_letter_returns_none_without_a_letter(text):
    assert parse_letter(text) is None


def test_accuracy_groups():
    rows = [{"id": "1", "answer": "a", "f": "x"}, {"id": "2", "answer": "b", "f": "x"},
            {"id": "3", "answer": "a", "f": "y"}]
    answers = {"1": "a", "2": "a", "3": "a"}
    assert accuracy(rows, answers) == pytest.approx(2 / 3)
    assert accuracy_by(rows, answers, "f") == {"x": {"accuracy": 0.5, "rows": 2},
                                               "y": {"accuracy": 1.0, "rows": 1}}
