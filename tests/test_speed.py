"""The speed levers compute the same function: grouped window attention, the loss at the
labelled positions and the prediction levers (fused chunked MLPs, the vision tower in chunks,
the letters-only head, rope positions on the CPU), against transformers' and peft's own paths,
on the tiny model (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from vqa import tiny
from vqa.realsize import KOREAN_QUESTION
from vqa.speed import (
    GROUPED_ATTENTION,
    LABEL_WINDOW,
    answer_loss,
    grouped_attention,
    label_window,
    use_grouped_vision_attention,
)


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory, make_batch):
    """A random tiny Qwen2.5-VL and a training batch of three image sizes: 448x448 (whole
    windows only), 1024x768 and 300x200 (windows cut at the right and bottom edges)."""
    folder = tmp_path_factory.mktemp("speed")
    tokenizer = tiny.train_tokenizer([KOREAN_QUESTION] * 10 + ["what color is it?"] * 10)
    processor = tiny.tiny_processor(tokenizer)
    processor.image_processor.max_pixels = 1003520
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer), seed=0)
    return model, make_batch(processor, folder)


def _stock(model):
    model.set_attn_implementation({"vision_config": "sdpa"})


def test_grouped_vision_attention_gives_the_stock_logits_and_gradients(model_and_batch):
    model, batch = model_and_batch
    results = {}
    for name, setup in (("stock", _stock), ("grouped", use_grouped_vision_attention)):
        setup(model)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.model.visual.named_parameters()
                 if p.grad is not None}
        results[name] = (out.logits.detach(), out.loss.item(), grads)
    assert model.config.vision_config._attn_implementation == GROUPED_ATTENTION
    assert model.config.text_config._attn_implementation == "sdpa"
    (stock_logits, stock_loss, stock_grads), (logits, loss, grads) = results.values()
    assert torch.allclose(logits, stock_logits, atol=1e-5)
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert stock_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, stock_grads[name], atol=1e-6, rtol=1e-4), name
    _stock(model)


def test_grouped_attention_handles_mixed_window_sizes_like_one_call_per_window():
    torch.manual_seed(0)
    heads, dim = 2, 8
    bounds = [0, 64, 128, 136, 200, 216, 216, 280]  # sizes 64, 64, 8, 64, 16, 0 (empty), 64
    q, k, v = (torch.randn(1, heads, bounds[-1], dim) for _ in range(3))
    module = torch.nn.Module()
    out, _ = grouped_attention(module, q, k, v, cu_seq_lens_q=torch.tensor(bounds), scaling=0.3)
    assert out.shape == (1, bounds[-1], heads, dim)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.3).transpose(1, 2)
        assert torch.allclose(out[:, a:b], expected, atol=1e-6), (a, b)


def test_grouped_attention_refuses_what_it_was_not_built_for():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="vision tower"):
        grouped_attention(torch.nn.Module(), q, q, q)


def test_loss_at_the_labelled_positions_equals_the_models_own(model_and_batch):
    model, batch = model_and_batch
    labels = batch["labels"]
    assert label_window(labels) == LABEL_WINDOW  # the collator labels the last two tokens
    with torch.no_grad():
        full = model(**batch).loss
        assert answer_loss(model, batch).item() == pytest.approx(full.item(), rel=1e-5)
        items = (labels != -100).sum() * 3  # the Trainer's accumulated count
        summed = model(**batch, num_items_in_batch=items).loss
        assert answer_loss(model, batch, items).item() == pytest.approx(summed.item(), rel=1e-5)


def test_label_window_covers_the_earliest_labelled_row():
    labels = torch.full((2, 10), -100)
    labels[0, -2:] = 5
    labels[1, -4:] = 5
    assert label_window(labels) == 5
    assert label_window(torch.full((1, 4), -100)) == 1


@pytest.fixture
def adapted(model_and_batch):
    """The tiny model under a LoRA adapter with non-zero B (an untrained one adds nothing),
    and a prediction batch of the three image sizes."""
    from peft import LoraConfig, get_peft_model

    model, batch = model_and_batch
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"], init_lora_weights=False))
    peft_model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return peft_model, inputs


def test_fused_chunked_mlps_and_vision_chunks_give_peft_s_logits(adapted, monkeypatch):
    from vqa import speed

    model, inputs = adapted
    with torch.inference_mode():
        stock = model(**inputs, logits_to_keep=1).logits
    calls = []
    original = speed.effective_weight
    monkeypatch.setattr(speed, "effective_weight", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(speed, "FUSED_MIN_TOKENS", 1)
    monkeypatch.setattr(speed, "MLP_CHUNK_TOKENS", 100)  # chunks end mid-row
    n = speed.fuse_inference_mlps(model)
    linears = speed.fuse_inference_linears(model)
    speed.chunk_vision_tower(model, max_patches=1)  # one image a chunk
    with torch.inference_mode():
        fast = model(**inputs, logits_to_keep=1).logits
    config = model.get_base_model().config
    assert n == config.text_config.num_hidden_layers + config.vision_config.depth
    images = len(inputs["image_grid_thw"])  # the vision tower ran once per image
    layers = config.text_config.num_hidden_layers
    assert linears == 4 * layers  # q, k, v, o (the MLPs' projections are the MLPs')
    assert len(calls) == 3 * (layers + config.vision_config.depth * images) + 4 * layers
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # the pre-merge states are not kept
        vision = model.get_base_model().model.get_image_features(inputs["pixel_values"],
                                                                 inputs["image_grid_thw"])
    assert vision.last_hidden_state is None and len(vision.pooler_output) == images
    with torch.no_grad():  # training-style calls keep peft's path
        calls.clear()
        model.train()
        model(**inputs, logits_to_keep=1)
        model.eval()
    assert not calls


def test_effective_weight_is_what_peft_applies(adapted):
    from peft.tuners.lora import LoraLayer

    from vqa.speed import effective_weight

    model, _ = adapted
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(5, layer.in_features)
    weight, bias = effective_weight(layer, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), layer(x))
    layer.merged_adapters.append("default")  # merged: the caller keeps peft's path
    assert effective_weight(layer, torch.float32) is None
    layer.merged_adapters.clear()


def test_letters_only_head_and_rope_on_cpu_give_the_same_letter_scores(adapted):
    from vqa.speed import LetterHead, RopeIndex, letter_columns, letters_only_head

    model, inputs = adapted
    letters = [5, 9, 2, 7]
    with torch.inference_mode():
        stock = model(**inputs, logits_to_keep=1).logits[:, -1, letters]
        positions = RopeIndex(model.get_base_model().config)(inputs)
        letters_only_head(model, letters)
        cut = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
    assert isinstance(model.get_base_model().lm_head, LetterHead)
    assert cut.shape == stock.shape
    torch.testing.assert_close(cut[:, letter_columns(model, letters)], stock)
    assert letter_columns(model, [7, 5]) == [3, 0]


def test_image_groups_keep_whole_images_under_the_limit():
    from vqa.speed import image_groups

    assert image_groups([5, 5, 5, 20, 3, 3], 10) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert image_groups([], 10) == []
    assert image_groups([4], 10) == [(0, 1)]


def test_linear_patch_embedding_equals_the_conv(model_and_batch):
    from vqa.pretrain import linear_patch_embedding

    model, _ = model_and_batch
    twin = copy.deepcopy(model)
    pixels = torch.randn(64, 3 * 2 * 14 * 14)
    expected = model.model.visual.patch_embed(pixels)
    linear_patch_embedding(twin)
    torch.testing.assert_close(twin.model.visual.patch_embed(pixels), expected)
    assert twin.model.visual.patch_embed.proj.weight.shape == \
        model.model.visual.patch_embed.proj.weight.shape  # saved as the stock Conv3d


def test_layers_kept_out_of_checkpointing_give_the_same_gradients(model_and_batch):
    """UNCHECKPOINTED_LAYERS and UNCHECKPOINTED_ATTENTION spend memory on recomputing less, never
    on other gradients: checkpointing replays the LoRA dropout's masks, so keeping every layer's
    activations, or only their attention's, gives the gradients of recomputing every layer."""
    from vqa.config import load_config
    from vqa.model import attach_lora, keep_layer_activations
    from vqa.speed import inner_model

    model, batch = model_and_batch
    adapted = attach_lora(copy.deepcopy(model), load_config(["QUANT=none"], environ={}),
                          uncheckpointed_layers=1)
    layers = inner_model(adapted).model.language_model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [
        False]  # the last layer keeps its activations
    adapted.train()
    n = len(layers)
    gradients, saved = {}, {}
    # asked for, kept: at most every layer; attention blocks only below the layers kept whole
    for asked, kept in (((0, 0), (0, 0)), ((n + 5, 0), (n, 0)), ((0, n), (0, n)),
                        ((1, n), (1, n - 1))):
        assert keep_layer_activations(adapted, *asked) == kept
        assert [layer.gradient_checkpointing for layer in layers] == [
            i < n - sum(kept) for i in range(n)]
        assert [getattr(layer.mlp, "_vqa_checkpointed", False) for layer in layers] == [
            n - sum(kept) <= i < n - kept[0] for i in range(n)]
        sizes = {}  # what the forward saves for the backward pass, by storage
        torch.manual_seed(3)  # the same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.setdefault(t.untyped_storage().data_ptr(),
                                           t.untyped_storage().nbytes()) and t, lambda t: t):
            loss = answer_loss(adapted, batch)
        loss.backward()
        saved[kept] = sum(sizes.values())
        gradients[kept] = {name: p.grad.clone() for name, p in adapted.named_parameters()
                           if p.grad is not None}
        adapted.zero_grad(set_to_none=True)
    # keeping the attention holds more than checkpointing whole layers, less than keeping all
    assert saved[(0, 0)] < saved[(0, n)] < saved[(1, n - 1)] < saved[(n, 0)]
    assert len(gradients[(0, 0)]) > 10
    for kept in ((n, 0), (0, n)):
        assert gradients[(0, 0)].keys() == gradients[kept].keys()
        for name, gradient in gradients[(0, 0)].items():
            torch.testing.assert_close(gradients[kept][name], gradient)
