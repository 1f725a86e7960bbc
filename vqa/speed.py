"""The GPU speed levers of vqa, each exact (same function computed, fewer launches or bytes).

1. Window attention in the vision tower as one attention call per window size.
   Qwen2.5-VL's vision tower attends inside 112x112-pixel windows in 28 of its 32 blocks. Without
   flash-attn, transformers runs one SDPA call per window and image: 10,876 calls for a batch of
   24 images at 448x448, each ~54 us of CPU launch for ~7 us of GPU work (profiled on an H100),
   so the tower was launch-bound and took 0.65 s of a 0.72 s scoring forward. The windows of one
   batch come in a handful of sizes (full windows, and the cut ones at right and bottom edges):
   `grouped_attention` gathers the windows of each size into one batched SDPA call.
   Why not flash-attn's varlen kernel, which transformers calls directly: it builds against one
   torch/CUDA pair from source and ships no wheel for the pinned torch; grouping needs nothing.
   It is registered in transformers' AttentionInterface under a name with "flash" in it, which is
   how the vision tower decides to hand the kernel the window boundaries (cu_seqlens) instead of
   splitting itself.
2. The training loss only where there are labels (`answer_loss`): the reference computes
   full-vocabulary logits (152k columns, fp32 in the loss) at every position of every row and
   then masks all but two of them. Left padding puts the labelled tokens (the letter and
   <|im_end|>) at the end of each row, so `logits_to_keep` = the last few positions gives the
   same loss (up to float summation order) for a few rows of logits instead of the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPED_ATTENTION = "vqa_flash_grouped_sdpa"  # "flash" routes cu_seqlens to it (see above)
# Logit positions the training loss keeps per row: the one before the letter, the letter, and
# <|im_end|> (vqa.data.VQACollator labels the last two tokens).
LABEL_WINDOW = 3


def grouped_attention(module, query, key, value, attention_mask=None, scaling=None,
                      dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """Attention within each segment of a packed sequence, one SDPA call per segment length.

    query/key/value: (1, heads, tokens, head_dim), segments given by cu_seq_lens_q (as the
    vision tower passes them). Returns (1, tokens, heads, head_dim) like transformers' kernels.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("grouped_attention serves the vision tower's packed windows only")
    tokens = query.shape[2]
    bounds = cu_seq_lens_q.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        if length:
            by_length.setdefault(length, []).append(start)
    outputs, order = [], []
    for length, group in by_length.items():
        if len(by_length) == 1:  # one size: the windows are already consecutive
            q, k, v = (t.unflatten(2, (len(group), length)).squeeze(0).transpose(0, 1)
                       for t in (query, key, value))
        else:
            index = (torch.tensor(group, device=query.device)[:, None]
                     + torch.arange(length, device=query.device)).flatten()
            order.append(index)
            q, k, v = (t.index_select(2, index).unflatten(2, (len(group), length))
                       .squeeze(0).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training
                                             else 0.0, scale=scaling)
        # (windows, heads, length, dim) -> (windows * length, heads, dim)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    packed = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if order:  # back to the original token order
        inverse = torch.empty(tokens, dtype=torch.long, device=query.device)
        inverse[torch.cat(order)] = torch.arange(tokens, device=query.device)
        packed = packed.index_select(0, inverse)
    return packed.unsqueeze(0), None


def register_grouped_attention() -> str:
    """Makes GROUPED_ATTENTION a valid attn_implementation; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    return GROUPED_ATTENTION


def use_grouped_vision_attention(model) -> None:
    """The vision tower's window attention through `grouped_attention`; the language model
    keeps its own (SDPA). `model` is a Qwen2_5_VLForConditionalGeneration (before peft)."""
    model.set_attn_implementation({"vision_config": register_grouped_attention()})


def label_window(labels: torch.Tensor) -> int:
    """How many trailing positions of logits the loss needs: from the position that predicts
    the first labelled token (left padding puts labels at the end) to the end."""
    labelled = (labels != -100).any(0).nonzero()
    if not len(labelled):
        return 1
    return labels.shape[1] - int(labelled[0]) + 1


def labelled_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Causal-LM cross entropy of logits kept for the last positions only (`label_window`).

    The model's own loss up to summation order: mean over labelled tokens, or their sum over
    `num_items_in_batch` when the Trainer accumulates (its `compute_loss_func` contract).
    """
    logits = outputs.logits[:, :-1].float()
    target = labels[:, labels.shape[1] - outputs.logits.shape[1] + 1:].to(logits.device)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                           reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
    return loss / (count.to(loss.device) if torch.is_tensor(count) else count)


def answer_loss(model, inputs: dict, num_items_in_batch=None):
    """The loss of a labelled batch with logits only where `labelled_loss` needs them."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    outputs = model(**inputs, logits_to_keep=label_window(labels))
    return labelled_loss(outputs, labels, num_items_in_batch)
