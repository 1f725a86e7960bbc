"""vqa: Qwen VL QLoRA fine-tuning and prediction for multiple-choice visual question answering.

Stages (one script each under scripts/, one Make target each): data, model, preflight, train,
eval, submit. The modules: config (settings), data (CSV contract, prompts, collator), model
(loading, 4-bit, LoRA), tiny + pretrain + easyvqa (the embedded default), planning/ (the machine,
the peak-VRAM model and the run plan every stage reads), preflight, train + trainer (the
recipe and its training step), predict, evaluate, submission + submit + journal, speed (the
exact speed levers), oom, distributed, io (atomic artifacts), realsize (benchmark models).
"""

import os

# PyTorch's caching allocator with expandable segments: a batch of another shape grows the
# segments it has instead of reserving new blocks beside the old, so peak reserved memory stays
# near peak allocated (docs/BENCHMARKS.md). Set before torch initialises CUDA; a user's own
# PYTORCH_CUDA_ALLOC_CONF wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
