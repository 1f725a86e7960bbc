"""Qwen2-VL (`qwen2_vl`): patch 14, merge 2 (one visual token per 28x28 pixels) like Qwen2.5-VL,
but full attention within each image in all 32 vision blocks and a plain MLP (fc1, fc2) in each:
the default LoRA targets (q,k,v,o,gate,up,down) land in the language model only. Hub configs are
flat and leave the vision tower's shapes to transformers' defaults, which transformers' own
config class fills in."""

from vqa.families.base import Family, VisionShapes, attention_linears, merger_linears
from vqa.families.qwen2_5_vl import CLIP_MEAN, CLIP_STD


def vision_shapes(vision) -> VisionShapes:
    return VisionShapes(depth=vision.depth, hidden=vision.embed_dim,
                        intermediate=int(vision.embed_dim * vision.mlp_ratio),
                        out=vision.hidden_size, merge=vision.spatial_merge_size, mergers=1)


def vision_linears(v: VisionShapes) -> dict[str, list[tuple[int, int]]]:
    return {**attention_linears(v), "fc1": [(v.hidden, v.intermediate)] * v.depth,
            "fc2": [(v.intermediate, v.hidden)] * v.depth, "merger": merger_linears(v)}


FAMILY = Family(
    name="Qwen2-VL", model_types=("qwen2_vl",), transformers_module="qwen2_vl",
    model_class="Qwen2VLModel", processor_class="Qwen2VLProcessor",
    video_processor_class="Qwen2VLVideoProcessor", patch_size=14, merge_size=2, min_pixels=3136,
    max_pixels=12845056, image_mean=CLIP_MEAN, image_std=CLIP_STD, windowed_vision=False,
    fused_kernels=True,
    calibrated=True, vision_shapes=vision_shapes, vision_linears=vision_linears,
    # its vision tower attends over whole images in every block: more held per patch in
    # training than Qwen2.5-VL's windows (the 7B's rows of calibration.csv)
    peak_coefficients={"TRAIN_BYTES_PER_PATCH_UNIT": 4.55},
    tiny_vision=dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, hidden_act="quick_gelu",
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                     initializer_range=0.02), vision_out_key="hidden_size")
