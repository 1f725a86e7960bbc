"""What a model family is to vqa: the few facts in which Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5
differ.

Everything else (the data, the planner, training, prediction, the journal, the reports) is the
same for every family. A family module (qwen2_vl.py, qwen2_5_vl.py, qwen3_vl.py, qwen3_5.py)
defines one `Family`; vqa/families/__init__.py lists them. Adding a family is one such file, its
entries in vqa/planning/architectures.json, and its measured rows in
vqa/planning/calibration.csv (with the coefficients refitted on them, `peak_coefficients`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class VisionShapes:
    """The vision tower's shapes that decide its weights and memory."""

    depth: int
    hidden: int
    intermediate: int
    out: int  # the merger's output: the language model's hidden size
    merge: int  # spatial merge: merge x merge patches make one visual token
    mergers: int  # the merger, plus DeepStack's (Qwen3-VL)


@dataclass(frozen=True)
class Family:
    name: str  # as people write it: "Qwen2.5-VL"
    model_types: tuple[str, ...]  # config.json's model_type
    transformers_module: str  # transformers.models.<this>.modeling_<this>
    model_class: str  # the model inside ...ForConditionalGeneration (its rope index)
    processor_class: str  # transformers' processor and video processor of the family
    video_processor_class: str
    # The processor's published defaults: one visual token = (patch x merge)^2 pixels.
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # Windows in the vision tower (Qwen2.5-VL's 112-pixel windows with full attention in a few
    # blocks), or full attention within each image in every block.
    windowed_vision: bool
    # The peak-VRAM model's coefficients were fitted to, or checked on, this family's own
    # measured rows (vqa/planning/calibration.csv). A family without is planned with a wider
    # margin, and preflight says so.
    calibrated: bool
    vision_shapes: Callable[[object], VisionShapes]  # from a transformers vision config
    # (in, out) of every Linear of the vision tower by module name, given its shapes
    vision_linears: Callable[[VisionShapes], dict[str, list[tuple[int, int]]]]
    # a small vision_config for the CPU tests' tiny models (vqa/tiny.py), and the key of its
    # merger's output width (the language model's hidden size)
    tiny_vision: dict
    vision_out_key: str = "out_hidden_size"
    # The language model's Linears by module name, from its text config, where its layers are
    # not all Qwen2's attention + MLP (Qwen3.5's linear-attention layers); None = decoder_linears.
    text_linears: Callable[[object], dict[str, list[tuple[int, int]]]] | None = None
    # Decoder layers with a KV cache (full attention), from the text config; None = all of them.
    attention_layers: Callable[[object], int] | None = None
    # What the tiny text config of the CPU tests adds for this family, and its rope parameters
    # (vqa/tiny.py).
    tiny_text: dict | None = None
    tiny_rope: dict | None = None
    # The peak-VRAM model's coefficients refitted on this family's own measured rows, by name
    # (vqa/planning/peaks.py: DEFAULTS; the rows in vqa/planning/calibration.csv).
    peak_coefficients: dict[str, float] = field(default_factory=dict)
    # Whether the planner may keep decoder layers' activations (UNCHECKPOINTED_*), and why not.
    keeps_activations: bool = True
    keeps_reason: str = ""
    # A share of memory planned free beyond the uncalibrated margin, and why (one clause).
    extra_margin: float = 0.0
    margin_reason: str = ""
    # Whether its RMSNorms, rope and MLPs are Qwen2/Qwen3's, which vqa/kernels.py fuses on a GPU.
    fused_kernels: bool = False

    @property
    def pixels_per_token(self) -> int:
        return (self.patch_size * self.merge_size) ** 2

    def model_type_class(self):
        """The transformers class whose get_rope_index computes this family's positions."""
        import importlib

        module = importlib.import_module(f"transformers.models.{self.transformers_module}."
                                         f"modeling_{self.transformers_module}")
        return getattr(module, self.model_class)

    def image_processor(self, min_pixels: int, max_pixels: int):
        """The family's image processor (every family's is Qwen2-VL's class, with its own
        patch, merge and normalisation) with these pixel bounds."""
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(
            min_pixels=min_pixels, max_pixels=max_pixels, patch_size=self.patch_size,
            merge_size=self.merge_size, image_mean=list(self.image_mean),
            image_std=list(self.image_std))

    def processor(self, tokenizer, min_pixels: int, max_pixels: int, chat_template: str):
        """The family's own processor over `tokenizer`, with these pixel bounds."""
        import transformers

        return getattr(transformers, self.processor_class)(
            image_processor=self.image_processor(min_pixels, max_pixels), tokenizer=tokenizer,
            video_processor=getattr(transformers, self.video_processor_class)(),
            chat_template=chat_template)


def decoder_linears(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                    head_dim: int) -> dict[str, list[tuple[int, int]]]:
    """Qwen2's and Qwen3's decoder layers: attention projections and a gated MLP in each."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": [(hidden, q)] * layers, "k_proj": [(hidden, kv)] * layers,
            "v_proj": [(hidden, kv)] * layers, "o_proj": [(q, hidden)] * layers,
            "gate_proj": [(hidden, intermediate)] * layers,
            "up_proj": [(hidden, intermediate)] * layers,
            "down_proj": [(intermediate, hidden)] * layers}


def attention_linears(v: VisionShapes) -> dict[str, list[tuple[int, int]]]:
    """Every family's vision blocks: the fused query/key/value projection and the output one."""
    return {"qkv": [(v.hidden, 3 * v.hidden)] * v.depth, "proj": [(v.hidden, v.hidden)] * v.depth}


def merger_linears(v: VisionShapes) -> list[tuple[int, int]]:
    """One merger: merge x merge patches' states in, the language model's width out."""
    m = v.hidden * v.merge ** 2
    return [(m, m), (m, v.out)]


class UnsupportedModel(ValueError):
    """The model's family is none vqa serves."""
