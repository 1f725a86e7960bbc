"""The embedded default model: a tiny Qwen2.5-VL built locally, so the whole job runs offline (and
tiny models of the other families, for the tests).

It has the real architecture (`Qwen2_5_VLForConditionalGeneration`), the real processor classes
and a byte-level BPE tokenizer trained here on the task's own text with Qwen's special tokens and
chat template. It is saved with `save_pretrained` and loaded by the same `from_pretrained` calls
as `Qwen/Qwen2.5-VL-7B-Instruct`, so every later stage runs the real code path.

A random-init base cannot learn the task through LoRA alone (its frozen random head caps the
letter logits), so `build_tiny_model` also *pretrains* the base briefly with full fine-tuning on
a part of easy-vqa that the demo never uses (see docs/EMBEDDED_DEFAULT.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vqa.families import family_for

# Qwen2's special tokens in Qwen's order: with them first, their relative ids match the hub's.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The same pre-tokenisation regex as transformers' Qwen2Tokenizer.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2-VL's chat template for images and text, without the video and tool branches the embedded
# default never uses, and without Qwen's default system prompt: 12 tokens a row the tiny model
# does not need (a system message in `messages` is still rendered).
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The tiny architecture. head_dim = 128 / 4 = 32, so mrope_section must sum to 16. rope_theta is
# 1e4, not Qwen's 1e6: with 16 rotary frequencies and sequences of ~60 tokens, 1e6 leaves too
# little positional resolution to find the option lines (docs/EMBEDDED_DEFAULT.md). The vision
# tower is the family's own small one (vqa/families/: `tiny_vision`).
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6],
                 rope_theta=10_000.0)
# A 64x64 easy-vqa image is upscaled to 16 visual tokens (112x112 at Qwen2.5-VL's 28 pixels a
# token). At Qwen's own min_pixels (56x56, 4 tokens) the tiny model's colour answers reached
# 0.55 against 0.94 here (docs/EMBEDDED_DEFAULT.md).
TINY_MIN_TOKENS, TINY_MAX_TOKENS = 16, 256
EMBEDDED_FAMILY = "qwen2_5_vl"  # the embedded default's (make model)


def tiny_pixels(model_type: str = EMBEDDED_FAMILY) -> tuple[int, int]:
    """The tiny models' (min_pixels, max_pixels): 16 to 256 visual tokens an image."""
    per_token = family_for(model_type).pixels_per_token
    return TINY_MIN_TOKENS * per_token, TINY_MAX_TOKENS * per_token


TINY_MIN_PIXELS, TINY_MAX_PIXELS = tiny_pixels()


def train_tokenizer(corpus: list[str], vocab_size: int = 2048):
    """A Qwen2-style byte-level BPE trained on `corpus`, wrapped as transformers' Qwen2Tokenizer."""
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, model_type: str = EMBEDDED_FAMILY):
    """A tiny config of `model_type`'s family (vqa/families/) over the local tokenizer."""
    from transformers import AutoConfig

    family = family_for(model_type)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    text = dict(TINY_TEXT)
    mrope_section = text.pop("mrope_section")
    rope_theta = text.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section}
    rope.update(family.tiny_rope or {})
    text.update(family.tiny_text or {})
    text_config = dict(
        **text, vocab_size=vocab_size, hidden_act="silu", rms_norm_eps=1e-6,
        max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters=rope,
    )
    # Every vision field is set: the class defaults describe large checkpoints.
    vision_config = {**family.tiny_vision, family.vision_out_key: text["hidden_size"]}
    return AutoConfig.for_model(
        model_type, text_config=text_config, vision_config=vision_config,
        tie_word_embeddings=False, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_processor(tokenizer, model_type: str = EMBEDDED_FAMILY):
    """The family's stock processor over the local tokenizer, at the tiny models' pixels."""
    return family_for(model_type).processor(tokenizer, *tiny_pixels(model_type),
                                            QWEN_VL_CHAT_TEMPLATE)


def model_class(config):
    """The ...ForConditionalGeneration class transformers' Auto class maps `config` to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]


def init_tiny_model(config, seed: int):
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config)(config)
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, do_sample=False,
    )
    return model


def save_model_folder(model, processor, folder: Path, meta: dict) -> None:
    """Writes a hub-style model folder atomically: a half-written folder is never left behind."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "vqa_model.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
