"""Qwen2.5-VL (`qwen2_5_vl`): patch 14, merge 2 (one visual token per 28x28 pixels), a vision
tower of 32 blocks attending in 112-pixel windows (full attention in four), a gated SiLU MLP in
each block: its gate/up/down projections share the language model's names, so the default LoRA
targets land in the vision tower too. The family the peak-VRAM model was fitted to."""

from vqa.families.base import Family, VisionShapes, attention_linears, merger_linears

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vision_shapes(vision) -> VisionShapes:
    return VisionShapes(depth=vision.depth, hidden=vision.hidden_size,
                        intermediate=vision.intermediate_size, out=vision.out_hidden_size,
                        merge=vision.spatial_merge_size, mergers=1)


def vision_linears(v: VisionShapes) -> dict[str, list[tuple[int, int]]]:
    return {**attention_linears(v), "gate_proj": [(v.hidden, v.intermediate)] * v.depth,
            "up_proj": [(v.hidden, v.intermediate)] * v.depth,
            "down_proj": [(v.intermediate, v.hidden)] * v.depth, "merger": merger_linears(v)}


FAMILY = Family(
    name="Qwen2.5-VL", model_types=("qwen2_5_vl",), transformers_module="qwen2_5_vl",
    model_class="Qwen2_5_VLModel", processor_class="Qwen2_5_VLProcessor",
    video_processor_class="Qwen2VLVideoProcessor", patch_size=14, merge_size=2, min_pixels=3136,
    max_pixels=12845056, image_mean=CLIP_MEAN, image_std=CLIP_STD, windowed_vision=True,
    fused_kernels=True,
    calibrated=True, vision_shapes=vision_shapes, vision_linears=vision_linears,
    tiny_vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                     fullatt_block_indexes=[1], hidden_act="silu", in_channels=3,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                     window_size=112, tokens_per_second=2, initializer_range=0.02))
