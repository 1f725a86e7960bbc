import json

from vqa.io import file_fingerprint
from vqa.journal import PredictionJournal, journal_path, read_all


def test_journal_resumes_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "predictions.journal.jsonl"
    journal = PredictionJournal(path, {"model": "m", "test": "t1"})
    assert journal.load() == {}
    journal.append({"1": "a", "2": "b"})
    with open(path, "a") as handle:  # a kill in the middle of a write
        handle.write('{"id": "3", "ans')
    again = PredictionJournal(path, {"model": "m", "test": "t1"})
    assert again.load() == {"1": "a", "2": "b"}
    again.append({"3": "c"})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines[1:]] == [
        {"id": "1", "answer": "a"}, {"id": "2", "answer": "b"}, {"id": "3", "answer": "c"}]


def test_journal_of_another_run_is_set_aside(tmp_path):
    path = tmp_path / "predictions.journal.jsonl"
    first = PredictionJournal(path, {"adapter": "x"})
    first.load()
    first.append({"1": "a"})
    second = PredictionJournal(path, {"adapter": "y"})
    assert second.load() == {}
    assert (tmp_path / "predictions.journal.jsonl.stale").is_file()
    assert PredictionJournal(path, {"adapter": "y"}).load() == {}


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "f"
    assert file_fingerprint(path) is None
    path.write_text("a")
    first = file_fingerprint(path)
    path.write_text("b")
    assert file_fingerprint(path) != first


def test_journals_of_every_rank_merge_with_the_rows_answered_without_their_image(tmp_path):
    """read_all (what submit reads) merges the main journal and each rank's, with the notes on
    rows asked as text only, and passes over another run's journal and a torn last line."""
    main = tmp_path / "predictions.journal.jsonl"
    zero, one = (PredictionJournal(journal_path(main, rank), {"model": "m"}) for rank in (0, 1))
    for journal in (zero, one):
        journal.load()
    zero.append({"1": "a", "2": "b"}, {"2": "x.png: not an image PIL can read"})
    one.append({"3": "c"})
    with open(journal_path(main, 1), "a") as handle:
        handle.write('{"id": "4", "answer": "d"')  # killed mid-write
    other = PredictionJournal(journal_path(main, 2), {"model": "another"})
    other.load()
    other.append({"5": "a"})
    answers, text_only = read_all(main, {"model": "m"})
    assert answers == {"1": "a", "2": "b", "3": "c"}
    assert text_only == {"2": "x.png: not an image PIL can read"}
