"""Every family of vqa/families/ (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on CPU, on tiny models built
from a config like the embedded default: the visual-token rule against each family's own
processor, the weight counts against each module tree, the speed levers against transformers'
and peft's own paths, the planner's terms, and train -> eval -> submit."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from vqa import tiny
from vqa.config import DEFAULT_LORA_TARGETS, load_config
from vqa.families import FAMILIES, family_for

ROOT = Path(__file__).resolve().parents[1]
MODEL_TYPES = [f.model_types[0] for f in FAMILIES]


@pytest.fixture(scope="module")
def tokenizer():
    from vqa.realsize import KOREAN_QUESTION

    return tiny.train_tokenizer([KOREAN_QUESTION] * 10 + ["what color is the shape?"] * 10)


def _tiny(tokenizer, model_type: str, seed: int = 0):
    return (tiny.init_tiny_model(tiny.tiny_config(tokenizer, model_type), seed),
            tiny.tiny_processor(tokenizer, model_type))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("size", [(64, 64), (448, 448), (1024, 768), (768, 1024), (1400, 1400),
                                  (3000, 40), (33, 4000), (4032, 3024), (1920, 1080)])
def test_visual_tokens_are_each_familys_own_processors(model_type, size):
    from vqa.planning.shapes import visual_tokens_for

    family = family_for(model_type)
    for min_pixels, max_pixels in ((family.min_pixels, family.max_pixels),
                                   (family.min_pixels, 1003520), tiny.tiny_pixels(model_type)):
        processor = family.image_processor(min_pixels, max_pixels)
        grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
        expected = int(grid.prod()) // family.merge_size ** 2
        assert visual_tokens_for(size[1], size[0], min_pixels=min_pixels, max_pixels=max_pixels,
                                 patch_size=family.patch_size,
                                 merge_size=family.merge_size) == expected


def test_one_visual_token_is_32_pixels_square_in_qwen3_vl_and_28_before():
    from vqa.planning.shapes import visual_tokens_for

    def tokens(model_type, side):
        family = family_for(model_type)
        return visual_tokens_for(side, side, min_pixels=family.min_pixels,
                                 max_pixels=family.max_pixels, patch_size=family.patch_size,
                                 merge_size=family.merge_size)

    assert tokens("qwen3_vl", 1024) == 1024 and tokens("qwen2_5_vl", 1024) == 1369
    assert tokens("qwen2_vl", 1024) == 1369


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_weight_counts_match_each_familys_module_tree(tokenizer, model_type, tmp_path):
    """Linear weights (what bitsandbytes quantizes), embeddings and the LoRA parameters the
    default targets make, from config.json alone, equal what transformers and peft build."""
    from peft import LoraConfig, get_peft_model

    from vqa.planning.shapes import architecture_for

    model, processor = _tiny(tokenizer, model_type)
    tiny.save_model_folder(model, processor, tmp_path / "model", {})
    arch, _ = architecture_for(str(tmp_path / "model"))
    assert arch.family == model_type
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    assert arch.linear_params == linears
    assert arch.embedding_params == sum({id(p): p.numel() for p in (
        model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values())
    peft_model = get_peft_model(model, LoraConfig(r=8,
                                                  target_modules=DEFAULT_LORA_TARGETS.split(",")))
    assert arch.lora_params(8, DEFAULT_LORA_TARGETS) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)
    in_vision = any("lora_" in n and ".visual." in n for n, _ in peft_model.named_parameters())
    assert in_vision == (model_type == "qwen2_5_vl")  # only its vision MLPs share the names


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_grouped_vision_attention_gives_the_stock_logits_and_gradients(tokenizer, model_type,
                                                                       tmp_path, make_batch):
    from vqa.speed import use_grouped_vision_attention

    model, processor = _tiny(tokenizer, model_type)
    batch = make_batch(processor, tmp_path)
    results = {}
    for name in ("stock", "grouped"):
        if name == "stock":
            model.set_attn_implementation({"vision_config": "sdpa"})
        else:
            use_grouped_vision_attention(model)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results[name] = (out.logits.detach(), {n: p.grad.clone() for n, p in
                                                model.model.visual.named_parameters()
                                                if p.grad is not None})
    (stock, stock_grads), (grouped, grads) = results["stock"], results["grouped"]
    torch.testing.assert_close(grouped, stock, atol=1e-5, rtol=1e-4)
    assert grads.keys() == stock_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, stock_grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prediction_levers_give_peft_s_letter_scores(tokenizer, model_type, tmp_path,
                                                     monkeypatch, make_batch):
    """The LoRA merged on the fly with MLPs in chunks, the vision tower one image at a time
    (DeepStack's features too, in Qwen3-VL), the letters-only head and rope positions computed
    on the CPU: the letter logits of the stock model under peft."""
    from peft import LoraConfig, get_peft_model

    from vqa import speed
    from vqa.speed import RopeIndex, letter_columns, letters_only_head

    model, processor = _tiny(tokenizer, model_type)
    torch.manual_seed(1)
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS.split(","),
        init_lora_weights=False)).eval()
    inputs = {k: v for k, v in make_batch(processor, tmp_path, train=False).items()}
    letters = [5, 9, 2, 7]
    with torch.inference_mode():
        stock = adapted(**inputs, logits_to_keep=1).logits[:, -1, letters]
    monkeypatch.setattr(speed, "FUSED_MIN_TOKENS", 1)
    monkeypatch.setattr(speed, "MLP_CHUNK_TOKENS", 100)  # chunks end mid-row
    assert speed.fuse_inference_mlps(adapted) > 0
    speed.fuse_inference_linears(adapted)
    speed.chunk_vision_tower(adapted, max_patches=1)  # one image a chunk
    letters_only_head(adapted, letters)
    with torch.inference_mode():
        positions = RopeIndex(adapted.get_base_model().config)(inputs)
        fast = adapted(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(fast[:, letter_columns(adapted, letters)], stock,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct",
                                      "Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct",
                                      "Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B"])
def test_each_familys_planned_peaks_grow_with_batch_and_length(model_id):
    from vqa.planning.peaks import infer_peak, train_peak
    from vqa.planning.shapes import architecture_for

    arch = architecture_for(model_id)[0]
    lora = dict(lora_r=32, lora_targets=DEFAULT_LORA_TARGETS)
    cases = [(1, 370, 256), (2, 370, 256), (2, 1113, 999), (4, 1113, 999)]
    train = [train_peak(arch, tokens=b * s, patches=b * 4 * v, logit_rows=3 * b, length=s,
                        fp32_casts=False, **lora).reserved for b, s, v in cases]
    assert train == sorted(train) and len(set(train)) == len(cases)
    for mode in ("score", "generate"):
        infer = [infer_peak(arch, batch=b, tokens=b * s, vision_patches=b * 4 * v, mode=mode,
                            **lora).reserved for b, s, v in cases]
        assert infer == sorted(infer) and len(set(infer)) == len(cases)


def test_each_familys_margin_covers_its_measured_error_and_says_why():
    from vqa.planning.hardware import budget_for
    from vqa.planning.planner import PLAN_MARGIN, UNCALIBRATED_MARGIN, plan_batches
    from vqa.planning.report import reasons
    from vqa.planning.rows import Workload
    from vqa.planning.shapes import architecture_for

    work = Workload([373] * 400, [256] * 400, [373] * 400, [256] * 400)
    config = load_config(["TARGET_GPU=A10G"], environ={})
    budget = budget_for("A10G", "", None)
    plans = {m: plan_batches(config, budget, architecture_for(m)[0], work)
             for m in ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct",
                       "Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3.5-4B")}
    assert plans["Qwen/Qwen2.5-VL-7B-Instruct"].budget["margin"] == PLAN_MARGIN
    assert plans["Qwen/Qwen2-VL-7B-Instruct"].budget["margin"] == PLAN_MARGIN
    qwen3 = plans["Qwen/Qwen3-VL-8B-Instruct"]
    assert qwen3.budget["margin"] == pytest.approx(PLAN_MARGIN + 0.02)
    assert "fitted on two sizes, each of which alone misses" in reasons(qwen3.to_json())[0]
    qwen35 = plans["Qwen/Qwen3.5-4B"]
    assert qwen35.budget["margin"] == pytest.approx(UNCALIBRATED_MARGIN + 0.10)
    assert qwen35.train_peak["reserved_gib"] <= qwen35.budget["planned_gib"]
    said = reasons(qwen35.to_json())
    assert "not yet checked on Qwen3.5's own measured peaks" in said[0]
    assert "linear-attention layers are counted like attention layers" in said[0]
    # a Qwen3.5 layer kept out of checkpointing ran out of memory: the planner keeps none
    assert qwen35.uncheckpointed_layers == qwen35.uncheckpointed_attention == 0
    assert any(r.startswith("UNCHECKPOINTED_LAYERS=0: every decoder layer is checkpointed: a "
                            "Qwen3.5 layer") for r in said)
    assert plans["Qwen/Qwen3-VL-8B-Instruct"].uncheckpointed_layers > 0  # others may keep


def test_an_unsupported_family_stops_every_stage_with_one_line(small_data, tmp_path):
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for script in ("preflight", "train", "submit"):
        done = subprocess.run([sys.executable, f"scripts/{script}.py", f"MODEL_ID={folder}",
                               f"DATA_DIR={small_data}", f"ARTIFACTS_DIR={tmp_path / 'a'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"vqa {script}: error: ") and "Traceback" not in done.stderr
        assert "model_type 'llava' is not a family vqa serves; supported: Qwen2-VL" in last


@pytest.mark.parametrize("model_type, reason", [
    ("qwen3_vl_moe", "bitsandbytes leaves its experts"),
    ("qwen3_5_moe", "bitsandbytes leaves its experts")])
def test_a_family_not_yet_served_is_refused_with_its_reason(model_type, reason, tmp_path):
    from vqa.families.base import UnsupportedModel
    from vqa.model import model_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedModel, match=reason) as info:
        model_family(str(tmp_path))
    assert "\n" not in str(info.value) and "supported: Qwen2-VL" in str(info.value)


def test_bitsandbytes_leaves_a_mixture_of_experts_in_bf16(tmp_path):
    """Why qwen3_vl_moe is refused: a tiny one loaded in 4-bit through from_pretrained keeps its
    experts as bf16 parameters, while its attention projections become 4-bit."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    rope = dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3],
                mrope_interleaved=True)
    config = AutoConfig.for_model(
        "qwen3_vl_moe", text_config=dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, rope_parameters=rope),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, deepstack_visual_indexes=[0],
                           num_position_embeddings=16, patch_size=16))
    AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.bfloat16)))
    experts = {n: p.dtype for n, p in model.named_parameters() if ".experts." in n}
    assert len(experts) == 4 and set(experts.values()) == {torch.bfloat16}
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)


def _teach_letters(model, processor, rows, data_dir, steps: int = 40):
    """A few full-parameter steps on the rows' letters, so a random tiny model answers with a
    letter first (LoRA alone on a random base does not get there; docs/EMBEDDED_DEFAULT.md)."""
    from vqa.data import VQACollator

    batch = VQACollator(processor, data_dir, train=True)(rows)
    batch.pop("row_ids")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_each_family_trains_evaluates_and_submits(tokenizer, model_type, tmp_path):
    """make train -> eval -> submit on a tiny model of the family, through the stage functions;
    then the adapter scored and generated: where generate's first word is a letter, it is the
    letter scoring picks."""
    from vqa.data import read_table
    from vqa.easyvqa import write_dataset
    from vqa.evaluate import evaluate
    from vqa.model import load_for_inference, load_processor
    from vqa.predict import predict_rows
    from vqa.submit import submit
    from vqa.train import train

    data = tmp_path / "data"
    write_dataset(data, 80, 24, seed=5)
    model, processor = _tiny(tokenizer, model_type)
    rows = read_table(data / "train.csv", with_answer=True).to_dict("records")[:16]
    _teach_letters(model, processor, rows, data)
    tiny.save_model_folder(model, processor, tmp_path / "model", {"family": model_type})
    config = load_config([f"MODEL_ID={tmp_path / 'model'}", f"DATA_DIR={data}",
                          f"ARTIFACTS_DIR={tmp_path / 'run'}", "EPOCHS=1", "VAL_SAMPLE=8",
                          "PER_DEVICE_BATCH=8", "PRED_BATCH_SIZE=8", "LR=2e-3"], environ={})
    metrics = train(config)
    assert metrics["optimizer_steps"] == 5 and metrics["train_rows"] == 72
    adapter = tmp_path / "run" / "lora_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 32
    report = evaluate(config)
    submit(config)
    submission = pd.read_csv(tmp_path / "run" / "submission.csv", dtype=str)
    test = pd.read_csv(data / "test.csv", dtype=str)
    assert sorted(submission["id"]) == sorted(test["id"]) and set(submission["answer"]) <= set(
        "abcd")
    key = pd.read_csv(data / "test_answers.csv", dtype=str).set_index("id")["answer"]
    assert report["test"]["accuracy"] == pytest.approx(
        (submission.set_index("id")["answer"] == key.reindex(submission["id"])).mean())

    processor = load_processor(config)
    test_rows = test.to_dict("records")
    model, _ = load_for_inference(config, adapter, processor, mode="generate")
    generated = predict_rows(model, processor, test_rows, data, batch_size=8, mode="generate",
                             max_new_tokens=2)
    model, _ = load_for_inference(config, adapter, processor, mode="score")
    scored = predict_rows(model, processor, test_rows, data, batch_size=8, mode="score")
    direct = [i for i, text in generated.raw_outputs.items()
              if text.strip() and text.strip()[0] in "ABCD"]
    assert len(direct) >= len(test_rows) // 2, generated.raw_outputs
    assert {i: generated.answers[i] for i in direct} == {i: scored.answers[i] for i in direct}
    shutil.rmtree(tmp_path / "run" / "checkpoints", ignore_errors=True)
