"""vqa/kernels.py on CPU: every RMSNorm, SiLU MLP and decoder attention layer of each family's tiny
model is routed to the fused kernels, and the model computes what the stock one does, in the
forward and in the gradients (recomputed layers included). Liger's Triton kernels need a GPU, so
here they are replaced by plain-torch functions of the same contract, counted as they are called
(tests/test_gpu.py runs the real ones on a GPU)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from vqa import kernels, tiny
from vqa.families import FAMILIES, family_for

FUSED = [f.model_types[0] for f in FAMILIES if f.fused_kernels]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer(["what color is the shape?"] * 10)


class Fakes:
    """Stand-ins for Liger's three kernels (same arguments, same function), counting calls."""

    def __init__(self):
        self.calls = {"rms_norm": 0, "rope": 0, "silu_mul": 0}

    def rms_norm(self, x, weight, eps):
        self.calls["rms_norm"] += 1
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype)

    def rope(self, q, k, cos, sin, unsqueeze_dim):
        self.calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotated(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return q * cos + rotated(q) * sin, k * cos + rotated(k) * sin

    def silu_mul(self, gate, up):
        self.calls["silu_mul"] += 1
        return F.silu(gate) * up


@pytest.fixture
def fakes(monkeypatch):
    made = Fakes()
    monkeypatch.setattr(kernels, "_liger", lambda: (made.rms_norm, made.rope, made.silu_mul))
    monkeypatch.setattr(kernels, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(kernels, "FUSED_MIN_TOKENS", 1)  # the tiny batches' few tokens
    return made


def _batch(processor, tmp_path):
    from vqa.data import VQACollator
    from vqa.realsize import write_synthetic_data

    data = write_synthetic_data(tmp_path / "data", 2, 0, (96, 64))
    rows = [{"id": f"r{n}", "path": f"images/{n}.png", "question": "what color is the shape?",
             "a": "red", "b": "blue", "c": "green", "d": "black", "answer": "b"}
            for n in range(2)]
    batch = VQACollator(processor, data, train=True)(rows)
    batch.pop("row_ids", None)
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("model_type", FUSED)
def test_fused_kernels_cover_every_norm_mlp_and_attention_and_change_nothing(
        tokenizer, model_type, fakes, tmp_path):
    config = tiny.tiny_config(tokenizer, model_type)
    stock, fused = tiny.init_tiny_model(config, 0), tiny.init_tiny_model(config, 0)
    processor = tiny.tiny_processor(tokenizer, model_type)
    family = family_for(model_type)
    counts = kernels.use_fused_kernels(fused, family, smoke_test=False)

    def named(suffix):
        return [m for m in fused.modules() if type(m).__name__.endswith(suffix)]
    decoder = fused.model.language_model.layers
    assert counts["rms_norm"] == len([m for m in named("RMSNorm") if m.weight is not None])
    assert counts["rope"] == len(decoder)
    assert counts["silu_mul"] == len([m for m in fused.modules() if hasattr(m, "gate_proj")])
    assert kernels.use_fused_kernels(fused, family, smoke_test=False) == {
        "rms_norm": 0, "rope": 0, "silu_mul": 0}  # patched once only

    batch = _batch(processor, tmp_path)
    for model in (stock, fused):  # every decoder layer recomputed in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    logits, grads = _loss_and_grads(stock, batch)
    assert fakes.calls == {"rms_norm": 0, "rope": 0, "silu_mul": 0}  # the stock model: none
    fused_logits, fused_grads = _loss_and_grads(fused, batch)
    torch.testing.assert_close(fused_logits, logits)
    assert grads.keys() == fused_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)
    # forward, then each checkpointed layer's recomputation in the backward pass
    assert fakes.calls["rope"] == 2 * len(decoder)
    assert fakes.calls["silu_mul"] >= 2 * len(decoder)
    assert fakes.calls["rms_norm"] > 2 * len(decoder)

    # Inference (no gradients) keeps the stock MLP: vqa.speed's fused MLP wraps it there.
    fused.eval()
    before = dict(fakes.calls)
    with torch.no_grad():
        fused(**{k: v for k, v in batch.items() if k != "labels"})
    assert fakes.calls["silu_mul"] == before["silu_mul"]
    assert fakes.calls["rope"] == before["rope"] + len(decoder)


def test_tensors_off_the_gpu_and_small_calls_keep_the_stock_code(tokenizer, fakes, monkeypatch,
                                                                  tmp_path):
    model_type = FUSED[0]
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer, model_type), 0)
    kernels.use_fused_kernels(model, family_for(model_type), smoke_test=False)
    batch = _batch(tiny.tiny_processor(tokenizer, model_type), tmp_path)
    tokens = batch["input_ids"].numel()
    monkeypatch.setattr(kernels, "FUSED_MIN_TOKENS", tokens + 1)  # one token short
    model(**batch)
    assert fakes.calls["rope"] == 0 and fakes.calls["silu_mul"] == 0
    monkeypatch.setattr(kernels, "FUSED_MIN_TOKENS", 1)
    monkeypatch.setattr(kernels, "_on_gpu", lambda tensor: tensor.is_cuda)
    model(**batch)
    assert fakes.calls == {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    monkeypatch.setattr(kernels, "_on_gpu", lambda tensor: True)
    model(**batch)
    assert fakes.calls["rope"] == len(model.model.language_model.layers)


def test_a_family_without_them_and_a_gpu_that_cannot_run_them_keep_the_stock_code(
        tokenizer, fakes, monkeypatch, caplog):
    others = [f for f in FAMILIES if not f.fused_kernels]
    assert others, "Qwen3.5's norms are (1 + weight): not Qwen2's, so not fused"
    model_type = FUSED[0]
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer, model_type), 0)
    assert kernels.use_fused_kernels(model, others[0], smoke_test=False) == {}
    monkeypatch.setattr(kernels, "_smoke_test", lambda rms_norm: "CompilationError: no sm_90")
    with caplog.at_level(logging.WARNING, logger="vqa"):
        assert kernels.use_fused_kernels(model, family_for(model_type)) == {}
    assert "fused kernels off: they do not run on this GPU (CompilationError: no sm_90)" in \
        caplog.text
    assert not any(getattr(m, "_vqa_kernels", False) for m in model.modules())


def test_fused_kernels_is_a_zero_or_one_setting():
    from vqa.config import ConfigError, load_config

    assert load_config([], environ={}).fused_kernels == 1
    assert load_config(["FUSED_KERNELS=0"], environ={}).fused_kernels == 0
    with pytest.raises(ConfigError, match="FUSED_KERNELS=2: must be 0 or 1"):
        load_config(["FUSED_KERNELS=2"], environ={})
