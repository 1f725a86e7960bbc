"""Qwen3.5 (`qwen3_5`): natively multimodal, Qwen3-VL's vision tower without DeepStack (patch 16,
merge 2: one visual token per 32x32 pixels, 65,536 to 16,777,216 pixels an image, mean and std
0.5) and Qwen3-VL's processor, over a hybrid language model: three Gated DeltaNet
linear-attention layers (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj, a depthwise
conv1d) to one gated full-attention layer (q_proj twice as wide: query and output gate). The
default LoRA targets land in the full-attention layers' projections and every MLP, not in the
linear-attention layers. Its fast kernels (flash-linear-attention, causal-conv1d) are optional:
without them transformers runs the gated delta rule in PyTorch. The peak-VRAM model counts its
linear-attention layers like attention layers, unmeasured: planned with a wider margin."""

from vqa.families.base import Family
# Qwen3-VL's vision tower, without DeepStack (its config has no deepstack_visual_indexes)
from vqa.families.qwen3_vl import FAMILY as QWEN3_VL, vision_linears, vision_shapes


def layer_types(text) -> list[str]:
    return list(text.layer_types)


def text_linears(text) -> dict[str, list[tuple[int, int]]]:
    """Every Linear of the hybrid language model, by module name."""
    h, inter = text.hidden_size, text.intermediate_size
    types = layer_types(text)
    full = types.count("full_attention")
    linear = len(types) - full
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    gate = 2 if getattr(text, "attn_output_gate", True) else 1
    key = text.linear_num_key_heads * text.linear_key_head_dim
    value = text.linear_num_value_heads * text.linear_value_head_dim
    heads = text.linear_num_value_heads
    return {"q_proj": [(h, gate * q)] * full, "k_proj": [(h, kv)] * full,
            "v_proj": [(h, kv)] * full, "o_proj": [(q, h)] * full,
            "in_proj_qkv": [(h, 2 * key + value)] * linear, "in_proj_z": [(h, value)] * linear,
            "in_proj_b": [(h, heads)] * linear, "in_proj_a": [(h, heads)] * linear,
            "out_proj": [(value, h)] * linear,
            "gate_proj": [(h, inter)] * len(types), "up_proj": [(h, inter)] * len(types),
            "down_proj": [(inter, h)] * len(types)}


def attention_layers(text) -> int:
    return layer_types(text).count("full_attention")


FAMILY = Family(
    name="Qwen3.5", model_types=("qwen3_5",), transformers_module="qwen3_5",
    model_class="Qwen3_5Model", processor_class="Qwen3VLProcessor",
    video_processor_class="Qwen3VLVideoProcessor", patch_size=16, merge_size=2,
    min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5), windowed_vision=False, calibrated=False,
    peak_coefficients={"TRAIN_ACTIVATION_SCALE": 2.34, "INFER_TOKEN_SCALE": 42.5},
    vision_shapes=vision_shapes, vision_linears=vision_linears, text_linears=text_linears,
    attention_layers=attention_layers,
    tiny_rope={"mrope_interleaved": True},
    tiny_vision={k: v for k, v in QWEN3_VL.tiny_vision.items()
                 if k != "deepstack_visual_indexes"},
    tiny_text=dict(layer_types=["linear_attention"] * 3 + ["full_attention"],
                   full_attention_interval=4, linear_conv_kernel_dim=4,
                   linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                   linear_num_value_heads=4, attn_output_gate=True, head_dim=32),
    keeps_activations=False,
    keeps_reason="a Qwen3.5 layer kept out of checkpointing holds far more than the model counts "
                 "(15 kept layers of the 4B ran out of a 24 GiB cap planned at 16.2 GiB)",
    extra_margin=0.10,
    margin_reason="its Gated DeltaNet linear-attention layers are counted like attention "
                  "layers, not measured")
