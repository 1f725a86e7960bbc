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
    # One read of the boundaries per forward pass: every block gets the same tensor, and each
    # .tolist() would make the CPU wait for the GPU before it launches the next block's work.
    bounds = getattr(cu_seq_lens_q, "_vqa_bounds", None)
    if bounds is None:
        bounds = cu_seq_lens_q.tolist()
        cu_seq_lens_q._vqa_bounds = bounds
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
    """The vision tower's attention through `grouped_attention`; the language model keeps its
    own (SDPA). Qwen2.5-VL's segments are its windows; Qwen2-VL's and Qwen3-VL's (full
    attention within each image) are its images: one call per image size instead of one per
    image. `model` is a ...ForConditionalGeneration (before peft)."""
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


# ---------------------------------------------------------------------------------------------
# Prediction levers (eval mode, no gradients), applied by `vqa.model.load_for_inference`.
#
# 3. The LoRA merged on the fly (`fuse_inference_linears`), and the MLPs over chunks of tokens
#    (`fuse_inference_mlps`).
#    A 4-bit projection with peft's adapter costs, at every call: bitsandbytes dequantizes the
#    weight to bf16 and multiplies, peft clones that output (a defensive copy for backprop), runs
#    the two adapter matmuls over every token and adds: three extra tensors the size of the
#    output, 18,944 columns a token in the 7B's MLP. Here the MLP takes each projection's dense
#    weight once (dequantized, plus scaling * B @ A: one small matmul per call, no activation
#    sized work) and runs gate, up and down over MLP_CHUNK_TOKENS tokens at a time, so the
#    widest activations stay a chunk's, not the batch's. The attention projections get the same
#    dense weight, unchunked. The same function up to bf16 rounding.
# 4. The vision tower over a bounded number of patches at a time (`chunk_vision_tower`): its
#    attention and MLP activations grow with the batch's patches; images are independent in it,
#    so chunks of whole images give the same merged tokens. Only those are kept: the stock
#    tower also returns its pre-merge states, which the language model never reads.
# 5. The output layer cut to the four option letters (`letters_only_head`) for one-pass scoring:
#    the 7B's lm_head is 152,064 x 3,584 bf16 = 1 GiB of a prediction's memory, for 4 rows used.
# 6. Rope positions computed with the batch on the CPU (`RopeIndex`): Qwen2.5-VL's
#    get_rope_index walks the batch row by row with small kernels and device syncs (`.tolist()`,
#    `.item()`) while the GPU waits; given `position_ids`, the forward skips it.
# 7. Fused RMSNorm, rope and SiLU-mul kernels, in training and prediction: vqa/kernels.py.

FUSED_MIN_TOKENS = 256  # fewer tokens (generate's decode steps): bitsandbytes' 4-bit kernels win
MLP_CHUNK_TOKENS = 4096
# 64 images of 448x448 in one pass: each extra pass costs ~40 ms of fixed work (H200, make bench),
# so chunks only cut the peak of large images (seven 1400x1400 images hold 70,000 patches).
VISION_CHUNK_PATCHES = 65536


def effective_weight(linear, dtype: torch.dtype):
    """(weight, bias) that `linear` applies, dense in `dtype`: dequantized when 4-bit, with its
    active plain-LoRA adapters added. None where an adapter is of another kind (DoRA, LoRA bias,
    merged or disabled state): the caller keeps the module's own forward there."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    if not isinstance(linear, LoraLayer):
        return dequantize_module_weight(linear).to(dtype), linear.bias
    base = linear.get_base_layer()
    adapters = [a for a in linear.active_adapters if a in linear.lora_A]
    if (linear.merged or linear.disable_adapters
            or any(a in linear.lora_variant or linear.lora_bias.get(a) for a in adapters)):
        return None
    weight = dequantize_module_weight(base).to(dtype)
    for name in adapters:
        weight = torch.addmm(weight, linear.lora_B[name].weight.to(dtype),
                             linear.lora_A[name].weight.to(dtype), alpha=linear.scaling[name])
    return weight, None if base.bias is None else base.bias.to(dtype)


def _inference_call(module, tokens: int) -> bool:
    """Whether a call takes the fused path: no gradients, eval mode, enough tokens."""
    return not (torch.is_grad_enabled() or module.training or tokens < FUSED_MIN_TOKENS)


def wrap_forward_once(module, make_forward, mark: str = "_vqa_fused") -> bool:
    """Replaces `module.forward` by make_forward(module, original forward) unless the attribute
    `mark` says this wrapper is there already (each kind of wrapper has its own mark, so they
    stack: vqa/kernels.py's under this module's); True when it did."""
    if getattr(module, mark, False):
        return False
    module.forward = make_forward(module, module.forward)
    setattr(module, mark, True)
    return True


GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def is_gated_mlp(module) -> bool:
    """Qwen's MLP: down(act(gate(x)) * up(x)), in the language model and Qwen2.5-VL's tower."""
    return all(hasattr(module, n) for n in (*GATED_MLP, "act_fn"))


def fused_mlp_forward(mlp, original):
    """`mlp.forward` (down(act(gate(x)) * up(x))) as described in lever 3 above."""
    def forward(x):
        tokens = x.shape[:-1].numel()
        if not _inference_call(mlp, tokens):
            return original(x)
        weights = [effective_weight(p, x.dtype) for p in (mlp.gate_proj, mlp.up_proj,
                                                          mlp.down_proj)]
        if any(w is None for w in weights):
            return original(x)
        (gate, gate_b), (up, up_b), (down, down_b) = weights
        flat = x.reshape(tokens, x.shape[-1])
        out = flat.new_empty(tokens, down.shape[0])
        for start in range(0, tokens, MLP_CHUNK_TOKENS):
            piece = flat[start:start + MLP_CHUNK_TOKENS]
            hidden = mlp.act_fn(F.linear(piece, gate, gate_b))
            hidden *= F.linear(piece, up, up_b)
            out[start:start + MLP_CHUNK_TOKENS] = F.linear(hidden, down, down_b)
        return out.reshape(*x.shape[:-1], down.shape[0])
    return forward


def fuse_inference_mlps(model) -> int:
    """Every gate/up/down MLP of the model (language model and vision tower) takes the fused,
    chunked path in inference; training and small calls keep the stock one. Returns the count."""
    return sum(wrap_forward_once(module, fused_mlp_forward) for module in model.modules()
               if is_gated_mlp(module))


def fused_linear_forward(layer, original):
    """A LoRA layer's forward as one matmul with its effective weight (lever 3)."""
    def forward(x, *args, **kwargs):
        if args or kwargs or not _inference_call(layer, x.shape[:-1].numel()):
            return original(x, *args, **kwargs)
        weight = effective_weight(layer, x.dtype)
        return original(x) if weight is None else F.linear(x, *weight)
    return forward


def fuse_inference_linears(model) -> int:
    """Every LoRA layer outside the fused MLPs (`fuse_inference_mlps` first; what remains are
    the attention projections) applies its effective weight in one matmul in inference.
    Returns the count."""
    from peft.tuners.lora import LoraLayer

    in_mlps = {id(getattr(m, n)) for m in model.modules() if getattr(m, "_vqa_fused", False)
               for n in GATED_MLP if hasattr(m, n)}
    return sum(wrap_forward_once(module, fused_linear_forward) for module in model.modules()
               if isinstance(module, LoraLayer) and id(module) not in in_mlps)


def image_groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive images (first, last + 1) of at most `limit` patches together; an image
    larger than `limit` alone."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            groups.append((start, i))
            start, total = i, 0
        total += size
    if sizes:
        groups.append((start, len(sizes)))
    return groups


def _joined(outputs: list):
    """One vision output of the chunks' outputs, in order: their merged tokens, and (Qwen3-VL)
    their DeepStack features, level by level. Nothing else is kept."""
    def cat(tensors):  # one chunk: its own tensor, not a copy
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    first = outputs[0]
    joined = {"pooler_output": cat([o.pooler_output for o in outputs])}
    if getattr(first, "deepstack_features", None) is not None:
        joined["deepstack_features"] = [cat(level) for level in
                                        zip(*(o.deepstack_features for o in outputs))]
    return type(first)(**joined)


def chunk_vision_tower(model, max_patches: int | None = None) -> None:
    """The vision tower over whole images at most `max_patches` (VISION_CHUNK_PATCHES) at a time
    in inference. It returns only what the language model reads, in order: the merged tokens
    (`pooler_output`) and, in Qwen3-VL, the DeepStack features; the pre-merge states
    (`last_hidden_state`, a patch x 1,280 tensor) would otherwise stay allocated through the
    language model's whole forward."""
    visual = inner_model(model).model.visual
    if getattr(visual, "_vqa_chunked", False):
        return
    original = visual.forward

    def forward(hidden_states, grid_thw, **kwargs):
        if torch.is_grad_enabled() or visual.training:
            return original(hidden_states, grid_thw, **kwargs)
        sizes = grid_thw.prod(-1).tolist()
        outputs, first_patch = [], 0
        for a, b in image_groups(sizes, max_patches or VISION_CHUNK_PATCHES):
            n = sum(sizes[a:b])
            outputs.append(original(hidden_states[first_patch:first_patch + n], grid_thw[a:b],
                                    **kwargs))
            first_patch += n
        return _joined(outputs)

    visual.forward = forward
    visual._vqa_chunked = True


class LetterHead(torch.nn.Linear):
    """An output layer holding only the rows of `token_ids` (the option letters)."""

    token_ids: list[int]


def letters_only_head(model, token_ids: list[int]) -> None:
    """Replaces the model's lm_head by a LetterHead (lever 5): logits are then the letters' in
    `token_ids` order. For one-pass scoring only; generation needs the whole vocabulary."""
    from peft.utils.integrations import dequantize_module_weight

    inner = inner_model(model)
    head = inner.get_output_embeddings()
    if isinstance(head, LetterHead):
        return
    weight = dequantize_module_weight(head)
    small = LetterHead(head.in_features, len(token_ids), bias=head.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        small.weight.copy_(weight[token_ids])
        if head.bias is not None:
            small.bias.copy_(head.bias[token_ids])
    small.requires_grad_(False)
    small.token_ids = list(token_ids)
    inner.set_output_embeddings(small)


def letter_columns(model, token_ids: list[int]) -> list[int]:
    """Where the letters `token_ids` sit among the model's output logits."""
    head = inner_model(model).get_output_embeddings()
    if isinstance(head, LetterHead):
        return [head.token_ids.index(t) for t in token_ids]
    return list(token_ids)


def inner_model(model):
    """The ...ForConditionalGeneration inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


class RopeIndex:
    """The 3-D rope positions of a collated batch, on the CPU, from the config alone (lever 6).
    Borrows the family's own model class's functions (vqa/families/), so the positions are the
    model's."""

    def __init__(self, config):
        from vqa.families import family_for

        model_class = family_for(config.model_type).model_type_class()
        self.config = config
        self._index = model_class.get_rope_index
        self._vision = model_class.get_vision_position_ids

    def get_vision_position_ids(self, *args, **kwargs):
        return self._vision(self, *args, **kwargs)

    def __call__(self, batch: dict) -> torch.Tensor | None:
        if batch.get("image_grid_thw") is None or batch.get("mm_token_type_ids") is None:
            return None  # text only: the model's own 1-D positions
        positions, _ = self._index(self, batch["input_ids"], batch["mm_token_type_ids"],
                                   image_grid_thw=batch["image_grid_thw"],
                                   attention_mask=batch.get("attention_mask"))
        return positions
