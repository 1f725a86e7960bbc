"""vqa/realsize.py: real-size configs match the published parameter counts; synthetic data."""

import pandas as pd
import pytest
import torch

from vqa import realsize, tiny
from vqa.data import read_table


@pytest.mark.parametrize("name, billions", [("Qwen/Qwen2.5-VL-3B-Instruct", 3.755),
                                            ("Qwen/Qwen2.5-VL-7B-Instruct", 8.292)])
def test_real_size_config_has_the_published_parameter_count(name, billions):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny.train_tokenizer(["what color is it?"] * 10)
    config = realsize.real_size_config(name, tokenizer)
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_synthetic_data_follows_the_contract(tmp_path):
    realsize.write_synthetic_data(tmp_path, 8, 4, size=(64, 48))
    train = read_table(tmp_path / "train.csv", with_answer=True)
    test = read_table(tmp_path / "test.csv", with_answer=False)
    assert len(train) == 8 and len(test) == 4 and set(train["answer"]) == set("abcd")
    assert not set(train["id"]) & set(test["id"])
    assert train.at[0, "question"] == realsize.KOREAN_QUESTION
    assert pd.read_csv(tmp_path / "test.csv").shape[1] == 7
