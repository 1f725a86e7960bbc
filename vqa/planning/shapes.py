"""What a checkpoint is made of, from its config.json alone: the shapes that decide its memory,
and the rule that turns an image's size into visual tokens.

A model's shapes come from its config.json when it is a local folder or in the hub cache, else
from architectures.json beside this file (the published configs), so planning needs no weights
and no network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (as in transformers' image processor), for planning without pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_tokens_for(height: int, width: int, *, min_pixels: int, max_pixels: int,
                      patch_size: int = 14, merge_size: int = 2) -> int:
    """<|image_pad|> tokens one image costs in the language model."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Qwen2.5-VL checkpoint that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    merge: int

    @classmethod
    def from_config(cls, name: str, config: dict) -> "Architecture":
        """From a transformers config.json (text fields nested in text_config or flat)."""
        text = {**config, **(config.get("text_config") or {})}
        vision = config["vision_config"]
        return cls(
            name=name, hidden=text["hidden_size"], intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            vocab=text["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
            vision_depth=vision["depth"], vision_hidden=vision["hidden_size"],
            vision_intermediate=vision["intermediate_size"],
            vision_out=vision.get("out_hidden_size") or text["hidden_size"],
            merge=vision.get("spatial_merge_size", 2))

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of every Linear by its module name; bitsandbytes quantizes all of them."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        vh, vi, m = self.vision_hidden, self.vision_intermediate, self.vision_hidden * self.merge ** 2
        lm = self.layers
        vd = self.vision_depth
        return {
            "q_proj": [(h, h)] * lm, "k_proj": [(h, kv)] * lm, "v_proj": [(h, kv)] * lm,
            "o_proj": [(h, h)] * lm,
            "gate_proj": [(h, self.intermediate)] * lm + [(vh, vi)] * vd,
            "up_proj": [(h, self.intermediate)] * lm + [(vh, vi)] * vd,
            "down_proj": [(self.intermediate, h)] * lm + [(vi, vh)] * vd,
            "qkv": [(vh, 3 * vh)] * vd, "proj": [(vh, vh)] * vd,
            "merger": [(m, m), (m, self.vision_out)],
        }

    @property
    def linear_params(self) -> int:
        return sum(i * o for shapes in self.linears().values() for i, o in shapes)

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (one matrix when tied): never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets: str) -> int:
        """LoRA A and B matrices on every Linear whose name is a target (the vision tower's
        MLPs share the language model's names, so the reference targets land there too)."""
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        return sum(r * (i + o) for name, shapes in self.linears().items() if name in wanted
                   for i, o in shapes)


TABLE = "vqa/planning/architectures.json"


def published_architectures() -> dict:
    """architectures.json: the published configs of the Qwen2.5-VL Instruct checkpoints."""
    return json.loads(resources.files(__package__).joinpath("architectures.json").read_text())


def _from_file(name: str, path: Path) -> "Architecture":
    """The shapes in a config.json; ValueError naming the file when it is not a model config."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    try:
        return Architecture.from_config(name, config)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a Qwen2.5-VL config.json (missing {exc})") from None


def cached_config(model_id: str) -> Path | None:
    """The hub cache's config.json of `model_id`, or None when it is not cached (or no hub id)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except HFValidationError:  # a path that is not a folder here: no hub id either
        return None
    return Path(found) if isinstance(found, str) else None


def architecture_for(model_id: str) -> tuple[Architecture, str]:
    """The model's shapes and where they came from: its config.json when it is a local folder
    or in the hub cache, else the package's table of published configs. ValueError when the
    config.json found is broken or the model is in none of them."""
    local = Path(model_id) / "config.json"
    if local.is_file():
        return _from_file(model_id, local), str(local)
    cached = cached_config(model_id)
    if cached is not None:
        return _from_file(model_id, cached), str(cached)
    table = published_architectures()
    if model_id in table["models"]:
        shapes, common = table["models"][model_id], table["common"]
        config_json = {
            "hidden_size": shapes["hidden_size"], "intermediate_size": shapes["intermediate_size"],
            "num_hidden_layers": shapes["num_hidden_layers"],
            "num_attention_heads": shapes["num_attention_heads"],
            "num_key_value_heads": shapes["num_key_value_heads"],
            "vocab_size": shapes["vocab_size"],
            "tie_word_embeddings": shapes["tie_word_embeddings"],
            "vision_config": {**common["vision_config"],
                              "out_hidden_size": shapes["vision_out_hidden_size"]}}
        return (Architecture.from_config(model_id, config_json),
                f"the package's table of published configs ({TABLE})")
    raise ValueError(f"no config.json for {model_id!r} (not a local folder, not cached, not in "
                     f"{TABLE}): cannot predict its memory")
