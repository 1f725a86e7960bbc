"""Fused GPU kernels for the elementwise work between the matmuls (FUSED_KERNELS=1, the default).

Profiled on Qwen3-VL-8B at 1024x768 on an H200 (a torch-profiler run; docs/BENCHMARKS.md, the
8B's `make bench` section): about a third of a training micro-step's GPU time and a quarter of
a scoring batch's went to elementwise kernels, not to matmuls. Three sources, each many passes
over a hidden-wide tensor where one would do:
- RMSNorm (four per decoder layer with Qwen3's q/k norms): to fp32, square, mean, rsqrt,
  multiply, back to bf16, multiply by the weight, and as many kernels again in its backward;
- rope on the queries and keys: rotate_half's slices, negation and concatenation, two products
  and a sum, for each;
- the MLP's SiLU(gate) times up, and their backward.
Liger Kernel (liger-kernel, pinned in requirements.lock) has a Triton kernel for each, forward
and backward, computing the same function in one pass (fp32 inside, the input's dtype out:
`casting_mode="llama"` is transformers' Qwen2/Qwen3 RMSNorm). Why a library and not our own
kernels: it is maintained against transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL modules and
tested on the cards vqa serves.

Why not Liger's own `apply_liger_kernel_to_qwen3_vl`: it replaces module-level classes and
functions for every model built afterwards (the benchmark's reference included) and also swaps
the model's forward for its fused loss, where vqa has its own (`vqa.speed.answer_loss`). Here
each model is patched on its own modules: its RMSNorms and MLPs get a forward that calls the
kernel on CUDA tensors and the stock code otherwise (the tests compare both), and its decoder
attention layers turn the fused rope on for their own calls only (a context variable that the
family's `apply_rotary_pos_emb`, replaced once by a dispatcher, reads; gradient
checkpointing's recomputation runs through the same layer forward, so it sees the same kernels).

Only families whose norms and MLPs are Qwen2/Qwen3's (`Family.fused_kernels`), only on CUDA,
only for calls over FUSED_MIN_TOKENS tokens or more (below, a step is launch-bound and the
kernels make it slower), and only when the kernels run: a card or Triton that cannot compile
them logs one line and keeps the stock code.
"""

from __future__ import annotations

import contextvars
import importlib
import logging

import torch

from vqa.speed import is_gated_mlp, wrap_forward_once

log = logging.getLogger("vqa")

# Calls over fewer tokens keep the stock code. A small micro-batch's step is bound by the CPU's
# kernel launches, and a Triton launch costs the CPU more than the stock kernels it replaces: at
# micro-batch 2 the fused kernels made a micro-step slower (make bench's lever rows, H200,
# 2026-12-01: 7B at 448x448, 740 tokens a call, 0.727 -> 0.857 s; Qwen3-VL-8B at 1024x768,
# 1,770 tokens, 0.861 -> 0.969 s), at micro-batch 16 faster (Qwen3-VL-8B at 1024x768, 14,160
# tokens: 1.677 s, against 2.085 s without them in a profiling run; docs/BENCHMARKS.md).
FUSED_MIN_TOKENS = 4096
# Inside a patched attention layer's call: the rope kernel it was patched with.
_FUSED_ROPE = contextvars.ContextVar("vqa_fused_rope", default=None)


def _on_gpu(tensor: torch.Tensor) -> bool:
    """Whether the kernels take this tensor (Triton runs on CUDA only); the tests replace it."""
    return tensor.is_cuda


def _enough(tokens: int) -> bool:
    return tokens >= FUSED_MIN_TOKENS


def _tokens(x: torch.Tensor) -> int:
    """Tokens of a (batch, length, ...) activation, or patches of the vision tower's (patches,
    width) ones."""
    return x.shape[0] * x.shape[1] if x.dim() >= 3 else x.shape[0]


def _liger():
    """Liger's three functions: (rms_norm(x, weight, eps), rope(q, k, cos, sin, unsqueeze_dim),
    silu_mul(gate, up)); the tests replace this with CPU equivalents."""
    from liger_kernel.ops import LigerRMSNormFunction, LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return (lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False),
            lambda q, k, cos, sin, dim: liger_rotary_pos_emb(q, k, cos, sin, None, dim),
            LigerSiLUMulFunction.apply)


def _wrap_once(module, make_forward) -> bool:
    return wrap_forward_once(module, make_forward, mark="_vqa_kernels")


def _norm_forward(rms_norm):
    def make(norm, original):
        def forward(hidden_states):
            if (_on_gpu(hidden_states) and _enough(_tokens(hidden_states))
                    and norm.weight.dtype == hidden_states.dtype):
                return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
            return original(hidden_states)  # e.g. fp32 weights under FP32_CASTS: stock promotion
        return forward
    return make


def _mlp_forward(silu_mul):
    def make(mlp, original):
        def forward(x):
            # Inference calls keep `original`: vqa.speed's fused, chunked MLP wraps this one.
            if not (_on_gpu(x) and torch.is_grad_enabled() and _enough(_tokens(x))):
                return original(x)
            return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
        return forward
    return make


def _attention_forward(rope):
    def make(attention, original):
        def forward(*args, **kwargs):
            token = _FUSED_ROPE.set(rope)
            try:
                return original(*args, **kwargs)
            finally:
                _FUSED_ROPE.reset(token)
        return forward
    return make


def _dispatch_rope(module) -> None:
    """The family module's apply_rotary_pos_emb, fused inside a patched layer's call and stock
    everywhere else (another model of the family, the CPU)."""
    stock = module.apply_rotary_pos_emb
    if getattr(stock, "_vqa_dispatch", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rope = _FUSED_ROPE.get()
        if rope is not None and _on_gpu(q) and _enough(q.shape[0] * q.shape[2]):
            return rope(q, k, cos, sin, unsqueeze_dim)
        return stock(q, k, cos, sin, unsqueeze_dim)
    apply_rotary_pos_emb._vqa_dispatch = True
    module.apply_rotary_pos_emb = apply_rotary_pos_emb


def _is_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and weight is not None and weight.dim() == 1)


def _is_silu_mlp(module) -> bool:
    act = getattr(module, "act_fn", None)  # transformers' ACT2FN["silu"] or torch's own
    return is_gated_mlp(module) and (isinstance(act, torch.nn.SiLU)
                                     or type(act).__name__ == "SiLUActivation")


def _smoke_test(rms_norm) -> str | None:
    """Why the kernels cannot run here (compiled on first use), or None."""
    try:
        x = torch.ones(2, 64, device="cuda", dtype=torch.bfloat16)
        rms_norm(x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6)
        torch.cuda.synchronize()
    except Exception as exc:  # a Triton or driver that cannot build them: keep the stock code
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return None


def use_fused_kernels(model, family, *, smoke_test: bool = True) -> dict[str, int]:
    """Patches `model`'s RMSNorms, SiLU MLPs and decoder attention layers (rope) as the module
    docstring says; returns how many of each, or {} where the kernels do not apply."""
    if not family.fused_kernels:
        return {}
    try:
        rms_norm, rope, silu_mul = _liger()
    except ImportError as exc:
        log.warning("fused kernels off: liger-kernel does not import (%s)", exc)
        return {}
    if smoke_test:
        problem = _smoke_test(rms_norm)
        if problem:
            log.warning("fused kernels off: they do not run on this GPU (%s); stock kernels",
                        problem)
            return {}
    _dispatch_rope(importlib.import_module(
        f"transformers.models.{family.transformers_module}."
        f"modeling_{family.transformers_module}"))
    counts = {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    for module in model.modules():
        if _is_norm(module):
            counts["rms_norm"] += _wrap_once(module, _norm_forward(rms_norm))
        elif _is_silu_mlp(module):
            counts["silu_mul"] += _wrap_once(module, _mlp_forward(silu_mul))
        elif (type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")
              and hasattr(module, "o_proj")):  # the decoder's; the vision tower's has qkv
            counts["rope"] += _wrap_once(module, _attention_forward(rope))
    log.info("fused kernels (Liger): %d RMSNorm, %d MLP SiLU-mul, %d attention rope",
             counts["rms_norm"], counts["silu_mul"], counts["rope"])
    return counts
