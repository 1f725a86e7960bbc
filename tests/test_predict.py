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


def test_prepared_batches_in_worker_processes_answer_like_the_main_process(
        tiny_model_dir, small_data):
    """DATALOADER_WORKERS > 0 (the default on a GPU) prepares batches in forked workers: the
    same answers and probabilities, and a row with a broken image is still answered text-only
    and reported, though the collator that saw it lived in a worker."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vqa.data import read_table
    from vqa.predict import predict_rows

    (small_data / "images" / "t2.png").write_bytes(b"not a png")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    rows = read_table(small_data / "test.csv", with_answer=False).to_dict("records")
    inline = predict_rows(model, processor, rows, small_data, batch_size=1, workers=0)
    forked = predict_rows(model, processor, rows, small_data, batch_size=1, workers=2)
    assert forked.answers == inline.answers and len(forked.answers) == len(rows)
    assert forked.letter_probs == inline.letter_probs
    assert set(forked.text_only) == set(inline.text_only) == {"te2"}
    assert "t2.png" in forked.text_only["te2"]


def test_scoring_keeps_no_kv_cache(tiny_model_dir, small_data):
    """The model's config keeps use_cache on for generate; one scoring pass must not build a
    cache (every layer's keys and values for the whole batch) it never reads."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vqa.data import read_table
    from vqa.predict import predict_rows

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    caches = []
    model.register_forward_hook(lambda module, args, output: caches.append(
        output.past_key_values))
    rows = read_table(small_data / "test.csv", with_answer=False).to_dict("records")
    result = predict_rows(model, processor, rows, small_data, batch_size=2, workers=0)
    assert len(result.answers) == len(rows) and caches and all(c is None for c in caches)


def test_after_an_out_of_memory_split_batches_still_come_from_the_workers(
        tiny_model_dir, small_data, monkeypatch):
    """The back-off halves the batch the workers prepared: the main process collates nothing,
    before the split or after it, and the answers are those of a run without a fault."""
    import os

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vqa import data, predict
    from vqa.data import read_table
    from vqa.oom import FaultInjector

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    rows = read_table(small_data / "test.csv", with_answer=False).to_dict("records")
    clean = predict.predict_rows(model, processor, rows, small_data, batch_size=2, workers=2)
    main, in_main = os.getpid(), []
    collate = data.VQACollator.__call__
    monkeypatch.setattr(data.VQACollator, "__call__", lambda self, batch: (
        in_main.append(len(batch)) if os.getpid() == main else None) or collate(self, batch))
    monkeypatch.setattr(predict, "FAULTS", FaultInjector(oom_at={1}))
    hurt = predict.predict_rows(model, processor, rows, small_data, batch_size=2, workers=2)
    assert hurt.oom_splits == [2] and in_main == []
    assert hurt.answers == clean.answers and len(hurt.answers) == len(rows)
