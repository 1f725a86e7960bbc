from pathlib import Path

import pandas as pd
import pytest
import torch

from vqa.data import (
    DataError,
    VQACollator,
    build_messages,
    prompt_text,
    read_table,
    resolve_image,
    stratified_sample,
    stratified_split,
)


def _rows(n, answers="abcd"):
    return [{"id": f"r{i}", "path": f"i{i}.png", "question": f"q{i}?", "a": "x", "b": "y",
             "c": "z", "d": "w", "answer": answers[i % len(answers)]} for i in range(n)]


def test_reads_utf8_with_bom_and_normalises_answers(tmp_path):
    frame = pd.DataFrame(_rows(4, "ABcd"))
    frame.at[0, "question"] = "이 도형은 무슨 색입니까?"
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbf" + frame.to_csv(index=False).encode("utf-8"))
    table = read_table(path, with_answer=True)
    assert list(table.columns[:2]) == ["id", "path"]  # the BOM did not stick to "id"
    assert list(table["answer"]) == ["a", "b", "c", "d"]
    assert table.at[0, "question"].startswith("이 도형은")


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.drop(columns=["c"]), "missing column(s) c"),
    (lambda f: f.iloc[0:0], "no rows (header only)"),
    (lambda f: f.assign(id=["r0", "r0", "r2", "r3"]), "row 3: duplicate id 'r0'"),
    (lambda f: f.assign(answer=["a", "e", "b", "c"]), "row 3 (id 'r1'): answer 'e' is not one"),
    (lambda f: f.assign(question=["q", "", "q", "q"]), "row 3 (id 'r1'): empty 'question'"),
])
def test_bad_tables_are_one_line_errors(tmp_path, mutate, message):
    path = tmp_path / "train.csv"
    mutate(pd.DataFrame(_rows(4))).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        read_table(path, with_answer=True)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_undecodable_text(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv", with_answer=False)
    unreadable = tmp_path / "locked.csv"
    unreadable.write_text("id,path,question,a,b,c,d\n")

    def denied(self):  # what a file without read permission does (tests may run as root)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match="locked.csv: cannot read \\(Permission denied\\)"):
        read_table(unreadable, with_answer=False)
    monkeypatch.undo()
    path = tmp_path / "test.csv"
    path.write_bytes(b"id,path,question,a,b,c,d\n1,x.png,\xff\xfe\xff?,a,b,c,d\n")
    with pytest.raises(DataError, match=r"neither UTF-8 .* nor CP949/EUC-KR text; save it as UTF-8"):
        read_table(path, with_answer=False)


@pytest.mark.parametrize("encoding", ["cp949", "euc-kr"])
def test_korean_csv_saved_as_cp949_or_euc_kr_is_decoded(tmp_path, encoding):
    path = tmp_path / "test.csv"
    text = "id,path,question,a,b,c,d\r\n1,x.png,이 도형은 무슨 색입니까?,빨간색,파란색,원,\"예\r\n아니오\"\r\n"
    path.write_bytes(text.encode(encoding))
    table = read_table(path, with_answer=False)
    assert table.at[0, "question"] == "이 도형은 무슨 색입니까?"
    assert table.at[0, "a"] == "빨간색" and table.at[0, "d"] == "예\r\n아니오"  # quoted newline kept


def test_test_table_needs_no_answer(tmp_path):
    path = tmp_path / "test.csv"
    pd.DataFrame(_rows(3)).drop(columns=["answer"]).to_csv(path, index=False)
    assert len(read_table(path, with_answer=False)) == 3


def test_image_paths_cannot_leave_data_dir(tmp_path):
    assert resolve_image(tmp_path, "images/a.png") == (tmp_path / "images/a.png").resolve()
    with pytest.raises(DataError, match="outside DATA_DIR"):
        resolve_image(tmp_path, "../secret.png")
    with pytest.raises(DataError, match="outside DATA_DIR"):
        resolve_image(tmp_path, "/etc/passwd")


def test_split_is_stratified_reproducible_and_complete():
    frame = pd.DataFrame(_rows(400))
    train, val = stratified_split(frame, 0.1, seed=7)
    assert len(val) == 40 and len(train) == 360
    assert set(train["id"]) | set(val["id"]) == set(frame["id"])
    assert not set(train["id"]) & set(val["id"])
    assert val["answer"].value_counts().to_dict() == {"a": 10, "b": 10, "c": 10, "d": 10}
    again, _ = stratified_split(frame, 0.1, seed=7)
    assert list(again["id"]) == list(train["id"])
    other, _ = stratified_split(frame, 0.1, seed=8)
    assert list(other["id"]) != list(train["id"])


def test_a_split_too_small_to_stratify_is_drawn_at_random_and_one_too_small_to_split_says_so():
    """Eight rows, two of each letter, at VAL_FRACTION=0.1: one validation row cannot hold four
    letters (scikit-learn raised a traceback); a single row cannot be split at all."""
    frame = pd.DataFrame(_rows(8))
    train, val = stratified_split(frame, 0.1, seed=7)
    assert (len(train), len(val)) == (7, 1)
    assert set(train["id"]) | set(val["id"]) == set(frame["id"])
    with pytest.raises(DataError, match=r"train.csv: 1 usable row\(s\) cannot be split"):
        stratified_split(frame.head(1), 0.1, seed=7, path="train.csv")


def test_validation_sample_is_capped_and_stratified():
    frame = pd.DataFrame(_rows(1000))
    sample = stratified_sample(frame, 256, seed=1)
    assert len(sample) == 256
    assert sample["answer"].value_counts().min() == 64
    assert len(stratified_sample(frame.head(50), 256, seed=1)) == 50


def test_prompt_lists_the_four_options_with_letters():
    row = _rows(1)[0] | {"question": "무슨 색입니까?"}
    text = prompt_text(row)
    assert text.splitlines()[:5] == ["무슨 색입니까?", "A. x", "B. y", "C. z", "D. w"]
    content = build_messages(row)[0]["content"]
    assert content[0] == {"type": "image"} and content[1]["text"] == text


def test_collator_labels_only_the_answer_letter_and_end(small_data, tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = read_table(small_data / "train.csv", with_answer=True).to_dict("records")[:3]
    batch = VQACollator(processor, small_data, train=True)(rows)
    labels, ids = batch["labels"], batch["input_ids"]
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends at the last column
    assert (labels != -100).sum(dim=1).tolist() == [2, 2, 2]
    tokenizer = processor.tokenizer
    for row, label_row in zip(rows, labels):
        letter, end = tokenizer.convert_ids_to_tokens(label_row[-2:].tolist())
        assert letter == row["answer"].upper() and end == "<|im_end|>"
    assert "mm_token_type_ids" in batch and batch["mm_token_type_ids"].sum() > 0
    # Blank images keep the shape of the batch but change the pixels.
    blank = VQACollator(processor, small_data, train=True, blank_images=True)(rows)
    assert torch.equal(blank["input_ids"], ids)
    assert not torch.equal(blank["pixel_values"], batch["pixel_values"])


@pytest.mark.parametrize("text, message", [
    ("id,answer\nT1,a\nT1,b\n", "row 3: duplicate id 'T1' (1 duplicate(s) in all)"),
    ("id,answer\nT1,a\nT2,e\n", "row 3 (id 'T2'): answer 'e' is not one of a, b, c, d"),
    ("id,letter\nT1,a\n", "missing column(s) answer; found id, letter"),
])
def test_a_bad_answer_key_is_one_line_naming_the_file_and_row(tmp_path, text, message):
    from vqa.data import DataError, read_answer_key

    (tmp_path / "test_answers.csv").write_text(text)
    with pytest.raises(DataError) as caught:
        read_answer_key(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'test_answers.csv'}: {message}"


def test_the_answer_key_is_optional_and_read_like_train_csv_s_answers(tmp_path):
    from vqa.data import read_answer_key

    assert read_answer_key(tmp_path) is None  # a competition's data has no key
    (tmp_path / "test_answers.csv").write_text("id,answer,family\n T1 , B ,color\nT2,c,shape\n")
    key = read_answer_key(tmp_path)
    assert key.to_dict("records") == [{"id": "T1", "answer": "b", "family": "color"},
                                      {"id": "T2", "answer": "c", "family": "shape"}]
