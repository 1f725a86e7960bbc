"""vqa: Qwen2.5-VL QLoRA fine-tuning and prediction for multiple-choice visual question answering.

Stages (one script each under scripts/, one Make target each): data, model, preflight, train,
eval, submit. The modules: config (settings), data (CSV contract, prompts, collator), model
(loading, 4-bit, LoRA), tiny + pretrain + easyvqa (the embedded default), memory (probes and
planning), train, predict, evaluate, submission, submit, preflight, io (atomic artifacts).
"""
