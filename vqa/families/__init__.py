"""The model families vqa serves, one module each: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

A family is found from config.json's `model_type` (`family_for`); what differs between families
is in its module (vqa/families/base.py says what), the rest of vqa is the same for all.
"""

from __future__ import annotations

from vqa.families import qwen2_5_vl, qwen2_vl, qwen3_vl
from vqa.families.base import Family, UnsupportedModel

FAMILIES: tuple[Family, ...] = (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)
# Families transformers ships beside these that vqa does not serve yet, and why.
NOT_YET = {
    "qwen3_vl_moe": "Qwen3-VL-30B-A3B's mixture of experts is not served yet: whether bitsandbytes "
                    "quantizes its experts, and what they hold in memory, is not measured",
    "qwen3_5": "Qwen3.5 is not served yet: its Gated DeltaNet linear-attention layers have no "
               "terms in the peak-VRAM model and were not measured",
    "qwen3_5_moe": "Qwen3.5's mixture of experts is not served yet: neither its linear-attention "
                   "layers nor its experts were measured",
}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str, source: str = "the model") -> Family:
    """The family of a config.json `model_type`; UnsupportedModel (one line) for any other."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in NOT_YET:
        raise UnsupportedModel(f"{source}: {NOT_YET[model_type]}; supported: {supported()}")
    raise UnsupportedModel(f"{source}: model_type {model_type!r} is not a family vqa serves; "
                           f"supported: {supported()}")
