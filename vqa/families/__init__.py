"""The model families vqa serves, one module each: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5.

A family is found from config.json's `model_type` (`family_for`); what differs between families
is in its module (vqa/families/base.py says what), the rest of vqa is the same for all.
"""

from __future__ import annotations

from vqa.families import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl
from vqa.families.base import Family, UnsupportedModel

FAMILIES: tuple[Family, ...] = (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY,
                                qwen3_5.FAMILY)
# Families transformers ships beside these that vqa does not serve yet, and why.
NOT_YET = {
    # transformers 5.23 stores each layer's experts as two 3-D parameters, not Linears, and
    # bitsandbytes 0.50.2 quantizes Linears only (tests/test_families.py loads a tiny one)
    "qwen3_vl_moe": "Qwen3-VL's mixture of experts is not served: bitsandbytes leaves its experts "
                    "(3-D parameters, not Linears) in bf16, so 4-bit QLoRA of 30B-A3B would hold "
                    "~58 GB of expert weights",
    "qwen3_5_moe": "Qwen3.5's mixture of experts is not served: bitsandbytes leaves its experts "
                   "(3-D parameters, not Linears) in bf16, so the model would not be 4-bit",
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
