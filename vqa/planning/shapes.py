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

from vqa.families import family_for
from vqa.families.base import VisionShapes, decoder_linears


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
    """The shapes of a checkpoint that decide its memory (any family of vqa/families/)."""

    name: str
    family: str  # model_type, e.g. qwen2_5_vl
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    merge: int
    vision_mergers: int = 1  # the merger, plus DeepStack's
    patch: int = 14  # the vision tower's patch side, in pixels
    # Decoder layers with a KV cache (0 = every layer), and the language model's Linears where
    # its family says (Qwen3.5's linear-attention layers), as (name, ((in, out), ...)) pairs.
    attention_layer_count: int = 0
    text_linear_shapes: tuple = ()

    @classmethod
    def from_config(cls, name: str, config: dict) -> "Architecture":
        """From a config.json's contents, parsed by transformers' own config class (which fills
        what a hub file leaves to its defaults). UnsupportedModel for a family vqa does not
        serve."""
        from transformers import AutoConfig

        model_type = config.get("model_type", "")
        family = family_for(model_type, name)  # before transformers: one line, any model_type
        parsed = AutoConfig.for_model(**config)
        text = parsed.get_text_config()
        vision = family.vision_shapes(parsed.vision_config)
        # Untied Qwen3-VL-8B/32B say so only at the top level, not in text_config.
        tied = config.get("tie_word_embeddings",
                          (config.get("text_config") or {}).get("tie_word_embeddings", False))
        text_linears = family.text_linears(text) if family.text_linears else {}
        return cls(
            name=name, family=model_type, hidden=text.hidden_size,
            intermediate=text.intermediate_size, layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=(getattr(text, "head_dim", None)
                      or text.hidden_size // text.num_attention_heads),
            vocab=text.vocab_size, tied=bool(tied), vision_depth=vision.depth,
            vision_hidden=vision.hidden, vision_intermediate=vision.intermediate,
            vision_out=vision.out, merge=vision.merge, vision_mergers=vision.mergers,
            patch=parsed.vision_config.patch_size,
            attention_layer_count=(family.attention_layers(text) if family.attention_layers
                                   else 0),
            text_linear_shapes=tuple((k, tuple(v)) for k, v in text_linears.items()))

    @property
    def attention_layers(self) -> int:
        """Decoder layers that attend over the whole sequence (and keep a KV cache)."""
        return self.attention_layer_count or self.layers

    @property
    def vision(self) -> VisionShapes:
        return VisionShapes(self.vision_depth, self.vision_hidden, self.vision_intermediate,
                            self.vision_out, self.merge, self.vision_mergers)

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of every Linear by its module name: the language model's, then the vision
        tower's (its family's); bitsandbytes quantizes all of them."""
        found = ({k: list(v) for k, v in self.text_linear_shapes} if self.text_linear_shapes
                 else decoder_linears(self.hidden, self.intermediate, self.layers, self.heads,
                                      self.kv_heads, self.head_dim))
        for name, shapes in family_for(self.family).vision_linears(self.vision).items():
            found[name] = found.get(name, []) + shapes
        return found

    @property
    def linear_params(self) -> int:
        return sum(i * o for shapes in self.linears().values() for i, o in shapes)

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (one matrix when tied): never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets: str) -> int:
        """LoRA A and B matrices on every Linear whose name is a target (in Qwen2.5-VL the
        vision tower's MLPs share the language model's names, so the reference targets land
        there too; in Qwen2-VL and Qwen3-VL they do not)."""
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        return sum(r * (i + o) for name, shapes in self.linears().items() if name in wanted
                   for i, o in shapes)


TABLE = "vqa/planning/architectures.json"


def published_architectures() -> dict:
    """architectures.json: the published configs of the Qwen VL checkpoints vqa serves."""
    return json.loads(resources.files(__package__).joinpath("architectures.json").read_text())


def _from_file(name: str, path: Path) -> "Architecture":
    """The shapes in a config.json; ValueError naming the file when it is not a model config."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path}: not a model's config.json (no model_type)")
    try:
        return Architecture.from_config(name, config)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a {config['model_type']} config.json ({exc})") from None


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
    table = published_architectures()["models"]
    if model_id in table:
        return (Architecture.from_config(model_id, table[model_id]["config"]),
                f"the package's table of published configs ({TABLE})")
    raise ValueError(f"no config.json for {model_id!r} (not a local folder, not cached, not in "
                     f"{TABLE}): cannot predict its memory")
