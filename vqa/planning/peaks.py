"""The peak-VRAM model: what one training step and one prediction batch hold at their peak.

Each term is named after what holds the memory; the few coefficients that physics alone does not
fix (bytes per logit and per vision patch, the allocator's slack) were fitted to peaks measured
with random-init real-size Qwen2.5-VL-3B/7B on vqa's own train step and prediction
(calibration.csv; docs/BENCHMARKS.md has the table and the errors). The estimates are in bytes,
for PyTorch's caching allocator: allocated, and reserved (what the card must have).
"""

from __future__ import annotations

from dataclasses import dataclass

from vqa.planning.hardware import GIB
from vqa.planning.shapes import Architecture

# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64,
# and an fp32 second-level absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Training, fitted by least squares on relative error to the 7B's rows of calibration.csv
# (coefficients non-negative); the 3B's rows were held out.
TRAIN_BYTES_PER_LOGIT = 6.8  # per vocabulary entry per token row: bf16 logits, fp32 loss, grads
# The saved residual stream and one recomputed layer (see train_peak), as a share of their bf16/
# fp32 sizes: a fit, since the recomputation frees as it goes.
TRAIN_ACTIVATION_SCALE = 0.92
# The vision tower's saved and recomputed activations, per patch, per block and hidden unit
# (106 kB a patch in Qwen2.5-VL's 32 blocks of 1,280).
TRAIN_BYTES_PER_PATCH_UNIT = 2.59
# The language model's attention with a padding mask (SDPA's masked kernel materialises scores):
# bytes per score, one layer at a time, batch x heads x length x length.
TRAIN_BYTES_PER_SCORE = 0.72
TRAIN_RESERVE_OF_ACTIVATIONS = 0.16  # the caching allocator's reserve over the activations
# What one decoder layer left un-checkpointed keeps for its backward pass, per token, as a share
# of ten hidden-wide and five intermediate-wide bf16 tensors (the norms', LoRA dropouts' and
# projections' inputs; gate, up, their product and the activation). Fitted to the 7B at 448x448,
# micro-batch 16, with 7, 14 and 28 layers un-checkpointed (274 KB a token; within 1.1%).
TRAIN_KEPT_LAYER_SCALE = 1.05
# What one decoder layer whose MLP alone is checkpointed (UNCHECKPOINTED_ATTENTION) keeps, per
# token, as a share of twelve hidden-wide and two key/value-wide bf16 tensors: the norm's input
# and fp32 copies, the LoRA dropouts' and projections' inputs, query, attention output and keys
# and values (counted with saved-tensor hooks on a small model; the scale fitted on the GPU).
TRAIN_KEPT_ATTENTION_SCALE = 0.97
# Prediction: each phase's peak allocated fitted by least squares on relative error (the vision
# tower's phase: the patch scale; the language model's: the token and score terms), then the
# reserve ratios that keep the largest reserved error smallest (calibration.csv).
INFER_TOKEN_SCALE = 6.1  # x the bf16 hidden state, per prompt token (residual, attention)
# x the bf16 attention width (heads x head_dim), per prompt token: the query, the attention's
# output and their rope'd copies are that wide, not hidden-wide. Qwen2/2.5-VL's widths are equal
# (INFER_TOKEN_SCALE holds them); Qwen3-VL-4B's is 4,096 against a hidden 2,560.
INFER_ATTENTION_WIDTH_SCALE = 0.0
INFER_BYTES_PER_SCORE = 0.21  # per batch x heads x length^2: the padding mask and scores
INFER_PATCH_SCALE = 17.3  # x the vision tower's bf16 hidden state, per patch of one chunk
VISION_RESERVED_RATIO = 1.14  # reserve over the transient (non-weight) part, vision phase
SCORE_RESERVED_RATIO = 1.16  # the same, the language model's phase of one-pass scoring
GENERATE_RESERVED_RATIO = 1.04  # the same for generate
# What Qwen2.5-VL does not have, zero for it: x the language model's bf16 hidden state, per
# visual token of the batch (Qwen3-VL's DeepStack features, held into the language model's
# phase, and their copies in the layers they are added to).
INFER_VISUAL_TOKEN_SCALE = 0.0
INFER_VISION_VISUAL_TOKEN_SCALE = 0.0  # the same in the vision tower's phase (features made so far)
# The coefficients above by name; a family refits some on its own measured rows
# (Family.peak_coefficients in vqa/families/, the rows in calibration.csv).
DEFAULTS = {name: value for name, value in dict(globals()).items()
            if name.isupper() and name.startswith(("TRAIN_", "INFER_"))
            or name.endswith("_RESERVED_RATIO")}


def pixel_values_per_patch(arch: Architecture) -> int:
    """Channels x temporal patch x the patch's pixels (14 x 14 in Qwen2/2.5-VL, 16 x 16 after)."""
    return 3 * 2 * arch.patch ** 2


@dataclass
class Estimate:
    """A predicted peak, in bytes, with the terms it is made of."""

    allocated: float
    reserved: float
    terms: dict[str, float]

    def gib(self) -> dict:
        return {"allocated_gib": round(self.allocated / GIB, 3),
                "reserved_gib": round(self.reserved / GIB, 3),
                "terms_gib": {k: round(v / GIB, 3) for k, v in self.terms.items()}}


def coefficients_for(arch: Architecture) -> dict[str, float]:
    """The coefficients for `arch`: the defaults, with its family's own fits over them."""
    from vqa.families import family_for

    return {**DEFAULTS, **family_for(arch.family).peak_coefficients}


def _weights(arch: Architecture, quant: str) -> float:
    per_param = NF4_BYTES_PER_PARAM if quant == "4bit" else 2
    return arch.linear_params * per_param


def train_peak(arch: Architecture, *, tokens: int, patches: int, lora_r: int, lora_targets: str,
               quant: str = "4bit", logit_rows: int | None = None, fp32_casts: bool = True,
               length: int | None = None, uncheckpointed: int = 0,
               attention_kept: int = 0) -> Estimate:
    """One QLoRA step: `tokens` = micro-batch x padded length, `patches` = vision patches of
    the micro-batch's images (4 per visual token). `logit_rows`: positions that get
    full-vocabulary logits (None = every token, as the model's own loss does; vqa's loss keeps
    only the labelled end of each row). `fp32_casts`: prepare_model_for_kbit_training's fp32
    copies of the unquantized weights (the reference) or not (bf16 kept). `length`: the padded
    sequence length (tokens / rows; None = one row of `tokens`). `uncheckpointed`: decoder
    layers (the last ones) that keep their activations instead of recomputing them;
    `attention_kept`: layers below those that keep their attention's and recompute their MLP."""
    c = coefficients_for(arch)
    lora = arch.lora_params(lora_r, lora_targets)
    upcast = quant == "4bit" and fp32_casts
    kept = min(uncheckpointed, arch.layers)
    attention = min(attention_kept, arch.layers - kept)
    # The backward pass frees the un-checkpointed (last) layers' activations before it recomputes
    # the first checkpointed layer, so the peak holds one or the other, not both. The layers
    # that keep only their attention's sit below them and hold it until their own backward.
    recomputed = c["TRAIN_ACTIVATION_SCALE"] * tokens * 12 * arch.intermediate
    layer_activations = max(recomputed, kept * tokens * c["TRAIN_KEPT_LAYER_SCALE"] * 2
                            * (10 * arch.hidden + 5 * arch.intermediate))
    kv_width = arch.kv_heads * arch.head_dim
    attention_activations = (attention * tokens * c["TRAIN_KEPT_ATTENTION_SCALE"] * 2
                             * (12 * arch.hidden + 2 * kv_width))
    terms = {
        "base weights (4-bit NF4)" if quant == "4bit" else "base weights (bf16)":
            _weights(arch, quant),
        # prepare_model_for_kbit_training casts what stays unquantized to fp32; bf16 otherwise
        "embeddings and lm_head": arch.embedding_params * (4 if upcast else 2),
        "autocast's bf16 copy of lm_head": arch.vocab * arch.hidden * 2 if upcast else 0,
        "LoRA weights, gradients, AdamW states (fp32)": lora * 16,
        "dequantized weight buffers": 2 * arch.hidden * arch.intermediate * 2,
        # the residual stream saved at each layer (fp32 behind fp32 embeddings, else bf16)
        "checkpointed activations": c["TRAIN_ACTIVATION_SCALE"] * tokens
        * (4 if upcast else 2) * arch.layers * arch.hidden,
        # one layer's MLP recomputed, or the un-checkpointed layers' activations
        "layer activations in the backward pass": layer_activations,
        "attention activations kept (MLP recomputed)": attention_activations,
        "language model attention scores": tokens * (length or tokens) * arch.heads
        * c["TRAIN_BYTES_PER_SCORE"],
        "logits and loss": (tokens if logit_rows is None else logit_rows) * arch.vocab
        * c["TRAIN_BYTES_PER_LOGIT"],
        "vision tower activations": patches * c["TRAIN_BYTES_PER_PATCH_UNIT"] * arch.vision_depth
        * arch.vision_hidden,
    }
    allocated = sum(terms.values())
    # The un-checkpointed layers' activations (and attention blocks') are made and freed in stack
    # order: they add next to nothing to the reserve (measured), so it is sized on the
    # recomputed layer.
    activations = terms["checkpointed activations"] + recomputed + sum(
        terms[k] for k in ("vision tower activations", "language model attention scores"))
    terms["allocator reserve"] = activations * c["TRAIN_RESERVE_OF_ACTIVATIONS"]
    return Estimate(allocated, allocated + terms["allocator reserve"], terms)


def vision_chunk(patches_per_image: list[int]) -> int:
    """The most patches the vision tower holds at once for these images (vqa/speed.py runs it
    over chunks of whole images of at most VISION_CHUNK_PATCHES)."""
    from vqa.speed import VISION_CHUNK_PATCHES, image_groups

    groups = image_groups(patches_per_image, VISION_CHUNK_PATCHES)
    return max((sum(patches_per_image[a:b]) for a, b in groups), default=0)


def infer_peak(arch: Architecture, *, batch: int, tokens: int, vision_patches: int, mode: str,
               lora_r: int, lora_targets: str, batch_patches: int | None = None,
               max_new_tokens: int = 16, quant: str = "4bit") -> Estimate:
    """The peak of one prediction batch: the larger of its two phases (`infer_phases`)."""
    phases = infer_phases(arch, batch=batch, tokens=tokens, vision_patches=vision_patches,
                          mode=mode, batch_patches=batch_patches, max_new_tokens=max_new_tokens,
                          quant=quant, lora_r=lora_r, lora_targets=lora_targets)
    peak = max(phases.values(), key=lambda phase: phase.reserved)
    return Estimate(max(phase.allocated for phase in phases.values()), peak.reserved, peak.terms)


def infer_phases(arch: Architecture, *, batch: int, tokens: int, vision_patches: int, mode: str,
                 lora_r: int, lora_targets: str, batch_patches: int | None = None,
                 max_new_tokens: int = 16, quant: str = "4bit") -> dict[str, Estimate]:
    """One prediction batch as vqa.model.prepare_for_inference sets it up: `tokens` = batch x
    padded prompt length, `batch_patches` = the batch's vision patches (4 per visual token),
    `vision_patches` = the most the vision tower holds at once (it runs over chunks of whole
    images of at most VISION_CHUNK_PATCHES: `vision_chunk`); `mode` score (lm_head cut to the
    four letters, no KV cache) or generate (whole lm_head, KV cache).

    The forward has two phases that do not overlap: the vision tower (one chunk's activations,
    beside the batch's input embeddings and the merged tokens made so far), then the language
    model. Each phase's estimate; the batch's pixels are held through both."""
    from vqa.speed import MLP_CHUNK_TOKENS

    c = coefficients_for(arch)
    batch_patches = vision_patches if batch_patches is None else batch_patches
    input_embeddings = arch.vocab * arch.hidden
    static = {
        "base weights (4-bit NF4)" if quant == "4bit" else "base weights (bf16)":
            _weights(arch, quant),
        "input embeddings (bf16)": input_embeddings * 2,
        # untied lm_head; one-pass scoring keeps only the letters' rows
        "lm_head (bf16)": 0 if mode == "score" else (arch.embedding_params - input_embeddings) * 2,
        "LoRA weights (bf16)": arch.lora_params(lora_r, lora_targets) * 2,
    }
    pixels = batch_patches * pixel_values_per_patch(arch) * 2  # held through both phases
    vision = {
        "the batch's input embeddings": tokens * arch.hidden * 2,
        "merged visual tokens": batch_patches / arch.merge ** 2 * arch.vision_out * 2,
        "visual tokens' extra activations": batch_patches / arch.merge ** 2
        * c["INFER_VISION_VISUAL_TOKEN_SCALE"] * 2 * arch.hidden,
        "vision tower activations (one chunk)": vision_patches * c["INFER_PATCH_SCALE"] * 2
        * arch.vision_hidden,
    }
    length = tokens / max(batch, 1)
    language = {
        # the fused MLP's dense gate, up and down, and one more while the next is made
        "dense MLP weights": 4 * arch.hidden * arch.intermediate * 2,
        "decoder activations": tokens * 2 * (c["INFER_TOKEN_SCALE"] * arch.hidden
                                             + c["INFER_ATTENTION_WIDTH_SCALE"] * arch.heads
                                             * arch.head_dim),
        "visual tokens' extra activations": batch_patches / arch.merge ** 2
        * c["INFER_VISUAL_TOKEN_SCALE"] * 2 * arch.hidden,
        # SDPA's masked kernel under left padding: one layer's scores, batch x heads x L x L
        "language model attention scores": batch * arch.heads * length ** 2
        * c["INFER_BYTES_PER_SCORE"],
        "MLP chunk": min(tokens, MLP_CHUNK_TOKENS) * 3 * arch.intermediate * 2,
        "last-position logits (fp32)": batch * (4 if mode == "score" else arch.vocab) * 4,
    }
    if mode == "generate":
        language["KV cache"] = (batch * (length + max_new_tokens) * arch.attention_layers * 2
                                * arch.kv_heads * arch.head_dim * 2)
    weights = sum(static.values())
    phases = {}
    for name, terms, ratio in (
            ("vision tower", vision, c["VISION_RESERVED_RATIO"]),
            ("language model", language,
             c["SCORE_RESERVED_RATIO" if mode == "score" else "GENERATE_RESERVED_RATIO"])):
        transient = pixels + sum(terms.values())
        phases[name] = Estimate(weights + transient, weights + transient * ratio,
                                {**static, "pixel values (bf16)": pixels, **terms,
                                 "allocator reserve": transient * (ratio - 1)})
    return phases
