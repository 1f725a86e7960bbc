"""vqa/realsize.py: real-size configs match the published parameter counts; synthetic data."""

import pandas as pd
import pytest
import torch

from vqa import realsize, tiny
from vqa.data import read_table


# The published counts: Qwen2.5-VL's model cards; Qwen3-VL-8B the real checkpoint's reported
# 8,767,123,696; the others transformers' own count of the published config (shared/facts).
@pytest.mark.parametrize("name, model_type, parameters", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 3.755e9),
    ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8.292e9),
    ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", 2_208_985_600),
    ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 8_291_375_616),
    ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl", 4_437_815_808),
    ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 8_767_123_696)])
def test_real_size_config_has_the_published_parameter_count(name, model_type, parameters):
    tokenizer = tiny.train_tokenizer(["what color is it?"] * 10)
    config = realsize.real_size_config(name, tokenizer)
    with torch.device("meta"):  # shapes only, no memory
        model = tiny.model_class(config)._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, abs=1e6)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.model_type == model_type


def test_synthetic_data_follows_the_contract(tmp_path):
    realsize.write_synthetic_data(tmp_path, 8, 4, size=(64, 48))
    train = read_table(tmp_path / "train.csv", with_answer=True)
    test = read_table(tmp_path / "test.csv", with_answer=False)
    assert len(train) == 8 and len(test) == 4 and set(train["answer"]) == set("abcd")
    assert not set(train["id"]) & set(test["id"])
    assert train.at[0, "question"] == realsize.KOREAN_QUESTION
    assert pd.read_csv(tmp_path / "test.csv").shape[1] == 7
