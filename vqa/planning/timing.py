"""How long train, eval and submit will take on a card: the time model behind preflight's hours.

Each batch's time is its matrix FLOPs over the card's published dense bf16 rate (fp16 on cards
without bf16: T4, V100), divided by an efficiency measured on the H200 for that kind of work,
plus the bytes its weights move over the card's memory bandwidth:
- FLOPs (`forward_flops`): the language model's Linears over every token of the padded batch,
  its attention over the sequence, lm_head at the positions kept, and the vision tower over
  each image's own patches (unpadded: patches are concatenated), its attention within 112-pixel
  windows (Qwen2.5-VL, with 4 blocks of full attention) or over the whole image (the others).
- Training runs a forward, a backward of about one forward (the base is frozen: only the
  activations' gradients and the adapter's are computed) and, under gradient checkpointing, the
  forward again for every checkpointed layer: (2 + share recomputed) x the forward.
- Weights: a 4-bit Linear is dequantized on every pass (read 0.5 byte a parameter, write and read
  2); 3 passes a training micro-step, 1 a scoring batch, 1 every generated token.
- Generation adds, per new token, a launch-bound step measured on the H200.
The batches are the run's own: the rows in a seeded order, cut at the plan's micro-batch or
prediction batch, each padded to its longest row.

EFFICIENCY holds what the H200 measured (make bench, 7B, 448x448, 2026-12-01; docs/BENCHMARKS.md):
the share of the card's matrix rate the product's step reaches. On another card the same shares
are assumed: an extrapolation from the H200. A slower card spends a larger share of its time in
matrix work, so the H200's launch and bookkeeping overheads make the prediction err on the long
side there.
"""

from __future__ import annotations

import random

from vqa.planning.shapes import Architecture

# Measured on the H200 with make bench's 7B rows at 448x448 (2026-12-01): `make train` at its
# plan (micro-batch 16, 6 layers and 3 attention blocks kept) 1.312 s an optimizer step of 16
# rows; `make submit`'s scoring at batch 64, 0.0214 s a row; generation of 16 tokens at batch 6,
# 0.2954 s a row. Each share is that run's FLOPs time at the card's rate over its measured time.
EFFICIENCY = {"train": 0.216, "score": 0.296}
GENERATE_STEP_SECONDS = 0.096  # a decoding step of one batch: kernel launches, not FLOPs
VISION_WINDOW_PATCHES = 64  # a 112-pixel window of 14-pixel patches
WINDOWED_FULL_BLOCKS = 4  # Qwen2.5-VL's full-attention blocks among its windowed ones
DEQUANT_BYTES = {"4bit": 4.5, "none": 2.0}  # weight bytes moved per parameter per pass
H200 = "H200"


def card_rates(card: dict) -> tuple[float, float, str]:
    """(matrix FLOP/s, memory bytes/s, the dtype they are for) of a gpus.json entry."""
    if card.get("bf16") and card.get("bf16_tflops"):
        return card["bf16_tflops"] * 1e12, card["memory_gbs"] * 1e9, "bf16"
    return card["fp16_tflops"] * 1e12, card["memory_gbs"] * 1e9, "fp16"


def forward_flops(arch: Architecture, length: int, visual_tokens: int, logit_positions: int,
                  windowed: bool = True) -> float:
    """Matrix FLOPs of one row's forward: the language model over `length` tokens, lm_head at
    `logit_positions`, the vision tower over its image's 4 patches per visual token."""
    h, kv = arch.hidden, arch.kv_heads * arch.head_dim
    q = arch.heads * arch.head_dim
    lm = arch.layers * (2 * h * q + 2 * h * kv + 3 * h * arch.intermediate)
    vh, vi = arch.vision_hidden, arch.vision_intermediate
    m = vh * arch.merge ** 2
    patches = (arch.merge ** 2) * visual_tokens
    vision = arch.vision_depth * (4 * vh * vh + 3 * vh * vi)
    if windowed:
        attended = ((arch.vision_depth - WINDOWED_FULL_BLOCKS) * VISION_WINDOW_PATCHES
                    + WINDOWED_FULL_BLOCKS * patches) * patches
    else:
        attended = arch.vision_depth * patches * patches
    attention = 4 * arch.attention_layers * length * length * q + 4 * attended * vh
    return (2 * lm * length + 2 * h * arch.vocab * logit_positions
            + 2 * vision * patches + 2 * (m * m + m * arch.vision_out) * visual_tokens
            * arch.vision_mergers + attention)


def batches(lengths: list[int], visual: list[int], size: int, seed: int | None
            ) -> list[tuple[int, list[int]]]:
    """The rows cut into batches of `size` (in a seeded random order, as the Trainer's sampler
    draws them; in file order when `seed` is None, as prediction runs): each batch's padded
    length and its rows' visual tokens."""
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    out = []
    for start in range(0, len(order), max(1, size)):
        chunk = order[start:start + size]
        out.append((max(lengths[i] for i in chunk), [visual[i] for i in chunk]))
    return out


def _batch_flops(arch: Architecture, padded: int, visual: list[int], logit_positions: int,
                 windowed: bool) -> float:
    text_only = forward_flops(arch, padded, 0, logit_positions, windowed)
    vision = sum(forward_flops(arch, 0, v, 0, windowed) for v in visual)
    return len(visual) * text_only + vision


def train_passes(arch: Architecture, kept_layers: int, kept_attention: int) -> float:
    """Forwards a training step costs: one, the backward's one, and the recomputation of each
    checkpointed layer (an attention-kept layer recomputes about two thirds of itself)."""
    layers = max(1, arch.layers)
    recomputed = (layers - kept_layers - kept_attention / 3) / layers
    return 2 + max(0.0, recomputed)


def train_epoch_seconds(arch: Architecture, lengths: list[int], visual: list[int], micro: int,
                        card: dict, *, quant: str = "4bit", kept_layers: int = 0,
                        kept_attention: int = 0, seed: int = 42, windowed: bool = True,
                        ranks: int = 1) -> float:
    """One epoch of training on `ranks` cards: every micro-batch's FLOPs and weight traffic."""
    rate, bandwidth, _ = card_rates(card)
    passes = train_passes(arch, kept_layers, kept_attention)
    weights = arch.linear_params * DEQUANT_BYTES[quant] * 3
    seconds = 0.0
    for padded, images in batches(lengths, visual, micro, seed):
        flops = passes * _batch_flops(arch, padded + 2, images, 3, windowed)
        seconds += flops / (rate * EFFICIENCY["train"]) + weights / bandwidth
    return seconds / max(1, ranks)


def predict_seconds(arch: Architecture, lengths: list[int], visual: list[int], batch: int,
                    card: dict, *, mode: str = "score", max_new_tokens: int = 16,
                    quant: str = "4bit", windowed: bool = True, ranks: int = 1) -> float:
    """Prediction of the rows (in file order) at `batch`: scoring, or generation's prefill and
    decoding steps."""
    rate, bandwidth, _ = card_rates(card)
    weights = arch.linear_params * DEQUANT_BYTES[quant]
    seconds = 0.0
    for padded, images in batches(lengths, visual, batch, None):
        seconds += (_batch_flops(arch, padded, images, 1, windowed)
                    / (rate * EFFICIENCY["score"]) + weights / bandwidth)
        if mode == "generate":
            seconds += max_new_tokens * (GENERATE_STEP_SECONDS + weights / bandwidth)
    return seconds / max(1, ranks)


def predicted_times(config, arch: Architecture, work, plan, card: dict, card_name: str,
                    val_rows: int, shifts: int = 1) -> dict:
    """Preflight's predicted wall time of each stage on `card`, in seconds: training per epoch
    (validation included) and over EPOCHS at best and worst of early stopping, make eval, make
    submit (TTA=rotate asks `shifts` times the rows)."""
    from vqa.families import family_for

    windowed = family_for(arch.family).windowed_vision
    ranks = config.world_size
    train = train_epoch_seconds(arch, work.train_lengths, work.train_visual,
                                plan.per_device_batch, card, quant=config.quant,
                                kept_layers=plan.uncheckpointed_layers,
                                kept_attention=plan.uncheckpointed_attention, seed=config.seed,
                                windowed=windowed, ranks=ranks)
    n_val = min(val_rows, len(work.train_lengths))
    validation = predict_seconds(arch, work.train_lengths[:n_val], work.train_visual[:n_val],
                                 plan.pred_batch_size, card, quant=config.quant,
                                 windowed=windowed)
    submit = predict_seconds(arch, work.predict_lengths * shifts, work.predict_visual * shifts,
                             plan.pred_batch_size, card, mode=config.infer_mode,
                             max_new_tokens=config.max_new_tokens, quant=config.quant,
                             windowed=windowed, ranks=ranks)
    epoch = train + validation
    # patience 1: at the earliest, the second epoch is worse than the first and training stops
    best_epochs = min(config.epochs, 1 + config.early_stopping_patience)
    return {"card": card_name, "extrapolated_from_h200": card_name != H200,
            "train_epoch_s": round(epoch, 1), "train_best_s": round(epoch * best_epochs, 1),
            "train_worst_s": round(epoch * config.epochs, 1), "best_epochs": best_epochs,
            "epochs": config.epochs, "eval_s": round(validation * shifts, 1),
            "submit_s": round(submit, 1), "efficiency": dict(EFFICIENCY),
            "generate_step_s": GENERATE_STEP_SECONDS}


def hours(seconds: float) -> str:
    """1 h 05 min, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def card_named(name: str) -> tuple[str, dict] | None:
    """The table's entry for a card by the name NVML gives it ("NVIDIA H200" is H200), the
    longest key first (H100-80GB before H100); None for a card the table does not know."""
    from vqa.planning.hardware import gpu_table

    table = gpu_table()
    name = name.upper().replace(" ", "")
    for key in sorted(table, key=len, reverse=True):
        if key.split("-")[0].upper() in name:
            return key, table[key]
    return None


def card_for(config, machine) -> tuple[str, dict] | None:
    """The card to predict for: TARGET_GPU's, else the first GPU found when the table knows it;
    None on a CPU machine or an unknown card."""
    from vqa.planning.hardware import gpu_table

    if config.target_gpu:
        return config.target_gpu, gpu_table()[config.target_gpu]
    found = (card_named(gpu.name) for gpu in getattr(machine, "gpus", None) or [])
    return next((card for card in found if card), None)


def preparation_seconds(config, processor, rows: list[dict], sample: int = 16) -> float | None:
    """Seconds a row takes on this machine's CPU to be decoded and processed into a training
    batch (one process), measured on up to `sample` rows; None when none can be prepared."""
    import time

    from vqa.data import DataError, VQACollator

    collate = VQACollator(processor, config.data_dir, train=True)
    rows = rows[:sample]
    if not rows:
        return None
    started = time.perf_counter()
    try:
        for row in rows:
            collate([row])
    except (DataError, OSError, ValueError):
        return None
    return (time.perf_counter() - started) / len(rows)


def time_lines(times: dict) -> list[str]:
    """preflight's predicted hours, one line each."""
    where = times["card"] + (" (extrapolated from the H200's measured efficiency)"
                             if times["extrapolated_from_h200"] else "")
    lines = [f"predicted on {where}: train {hours(times['train_epoch_s'])} an epoch, "
             f"{hours(times['train_best_s'])} to {hours(times['train_worst_s'])} in all "
             f"({times['best_epochs']} to {times['epochs']} epochs: early stopping), eval "
             f"{hours(times['eval_s'])}, submit {hours(times['submit_s'])}"]
    cpu = times.get("cpu_seconds_per_row")
    if cpu is None and times.get("cpu_skipped"):
        lines.append(f"CPU side: not measured ({times['cpu_skipped']})")
    if cpu is not None:
        gpu_row = times["train_epoch_s"] / max(1, times["train_rows"])
        bound = cpu / max(1, times["workers"]) > gpu_row
        lines.append(f"CPU side: {cpu:.3f} s a row to decode and process here, "
                     f"{times['workers']} worker(s) against the card's {gpu_row:.3f} s a row"
                     + (": DATALOADER-BOUND, the GPU will wait on the CPU (raise "
                        "DATALOADER_WORKERS or use a machine with more cores)" if bound else
                        ": the card, not the CPU, sets the pace"))
    return lines
