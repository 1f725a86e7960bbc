"""How long train, eval and submit will take on a card: the time model behind preflight's hours.

Each batch's time is its matrix FLOPs over the card's published dense bf16 rate (fp16 on cards
without bf16: T4, V100), divided by an efficiency measured on the H200 for that kind of work,
plus the bytes its non-matrix work and its weights move over the card's memory bandwidth:
- FLOPs (`forward_flops`): the language model's Linears over every token of the padded batch,
  its attention over the sequence, lm_head at the positions kept, and the vision tower over
  each image's own patches (unpadded: patches are concatenated), its attention within 112-pixel
  windows (Qwen2.5-VL, with 4 blocks of full attention) or over the whole image (the others).
- Non-matrix work (`forward_elements`): the hidden state of every token through every decoder
  layer and of every patch through every vision block, each element costing ELEMENT_BYTES of
  traffic (norms, rope, activations, casts, residuals, and the launches between them).
- Training runs a forward, a backward of about one forward (the base is frozen: only the
  activations' gradients and the adapter's are computed) and, under gradient checkpointing, the
  forward again for every checkpointed layer: (2 + share recomputed) x the forward.
- Weights: a 4-bit Linear is dequantized on every pass (read 0.5 byte a parameter, write and read
  2); 3 passes a training micro-step, 1 a scoring batch, 1 every generated token.
- Generation adds, per new token, a launch-bound step measured on the H200.
The batches are the run's own: the rows in a seeded order (training) or by text length
(prediction), cut at the plan's micro-batch or prediction batch, each padded to its longest row.

EFFICIENCY and ELEMENT_BYTES hold what the H200 measured (make bench BENCH_WORK=time, Qwen2.5-VL
3B and 7B at 448x448, 1024x768 and mixed photos, 2026-12-01; scripts/fit_time.py;
docs/BENCHMARKS.md): the share of the card's matrix rate the product's step reaches, and the
bytes a non-matrix pass moves per activation element and layer. Two sizes tell them apart: a
narrower model does less matrix work per element, so its non-matrix share is larger. On another
card the same factors are assumed: an extrapolation from the H200.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vqa.planning.shapes import Architecture

# Fitted by scripts/fit_time.py on the H200's rows of Qwen2.5-VL-3B and -7B at 448x448,
# 1024x768 and mixed photos (docs/measurements/time-h200-2026-12-01.json; docs/BENCHMARKS.md,
# "Predicted wall time against measured").
EFFICIENCY = {"train": 0.339, "score": 0.284}
ELEMENT_BYTES = {"train": 1141.0, "score": 43.0}
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
    draws them; when `seed` is None, by text length, longest first, as prediction orders them:
    vqa.predict.length_order): each batch's padded length and its rows' visual tokens."""
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: visual[i] - lengths[i])
    out = []
    for start in range(0, len(order), max(1, size)):
        chunk = order[start:start + size]
        out.append((max(lengths[i] for i in chunk), [visual[i] for i in chunk]))
    return out


@dataclass
class Cost:
    """What some batches ask of a card: matrix FLOPs, activation elements touched by the work
    that is not matrix products (norms, rope, activations, casts, residuals: counted as
    elements x layers they pass through), weight bytes moved, decoding steps."""

    flops: float = 0.0
    elements: float = 0.0
    weight_bytes: float = 0.0
    decode_steps: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.elements + other.elements,
                    self.weight_bytes + other.weight_bytes, self.decode_steps + other.decode_steps)

    def scaled(self, factor: float) -> "Cost":
        return Cost(self.flops * factor, self.elements * factor, self.weight_bytes * factor,
                    self.decode_steps)


def seconds(cost: Cost, card: dict, kind: str,
            factors: tuple[float, float] | None = None) -> float:
    """The card's time for `cost` done as `kind` of work (train or score), at the measured
    EFFICIENCY and ELEMENT_BYTES, or at `factors` (a fit's candidates: scripts/fit_time.py)."""
    rate, bandwidth, _ = card_rates(card)
    efficiency, element_bytes = factors or (EFFICIENCY[kind], ELEMENT_BYTES[kind])
    return (cost.flops / (rate * efficiency)
            + (cost.elements * element_bytes + cost.weight_bytes) / bandwidth
            + cost.decode_steps * GENERATE_STEP_SECONDS)


def forward_elements(arch: Architecture, length: int, visual_tokens: int) -> float:
    """Activation elements x layers of one row's forward: the language model's hidden state
    over `length` tokens through its layers, the vision tower's over its patches through its
    blocks."""
    patches = (arch.merge ** 2) * visual_tokens
    return (length * arch.hidden * arch.layers
            + patches * arch.vision_hidden * arch.vision_depth)


def _batch_cost(arch: Architecture, padded: int, visual: list[int], logit_positions: int,
                windowed: bool) -> Cost:
    text_only = forward_flops(arch, padded, 0, logit_positions, windowed)
    vision = sum(forward_flops(arch, 0, v, 0, windowed) for v in visual)
    elements = sum(forward_elements(arch, padded, 0) + forward_elements(arch, 0, v)
                   for v in visual)
    return Cost(len(visual) * text_only + vision, elements)


def train_passes(arch: Architecture, kept_layers: int, kept_attention: int) -> float:
    """Forwards a training step costs: one, the backward's one, and the recomputation of each
    checkpointed layer (an attention-kept layer recomputes about two thirds of itself)."""
    layers = max(1, arch.layers)
    recomputed = (layers - kept_layers - kept_attention / 3) / layers
    return 2 + max(0.0, recomputed)


def train_epoch_cost(arch: Architecture, lengths: list[int], visual: list[int], micro: int, *,
                     quant: str = "4bit", kept_layers: int = 0, kept_attention: int = 0,
                     seed: int = 42, windowed: bool = True) -> Cost:
    """One epoch of training: every micro-batch's forwards (train_passes) and weight traffic."""
    passes = train_passes(arch, kept_layers, kept_attention)
    cost = Cost()
    for padded, images in batches(lengths, visual, micro, seed):
        # the prompt's rows plus the letter and <|im_end|> the labels add
        cost += _batch_cost(arch, padded + 2, images, 3, windowed).scaled(passes)
        cost.weight_bytes += arch.linear_params * DEQUANT_BYTES[quant] * 3
    return cost


def train_epoch_seconds(arch: Architecture, lengths: list[int], visual: list[int], micro: int,
                        card: dict, *, ranks: int = 1, **options) -> float:
    """One epoch of training on `ranks` cards (options: those of train_epoch_cost)."""
    cost = train_epoch_cost(arch, lengths, visual, micro, **options)
    return seconds(cost, card, "train") / max(1, ranks)


def predict_cost(arch: Architecture, lengths: list[int], visual: list[int], batch: int, *,
                 mode: str = "score", max_new_tokens: int = 16, quant: str = "4bit",
                 windowed: bool = True) -> Cost:
    """Prediction of the rows (by text length, as `batches` orders them) at `batch`: scoring, or
    generation's prefill and its decoding steps."""
    weights = arch.linear_params * DEQUANT_BYTES[quant]
    cost = Cost()
    for padded, images in batches(lengths, visual, batch, None):
        cost += _batch_cost(arch, padded, images, 1, windowed)
        cost.weight_bytes += weights
        if mode == "generate":
            cost.decode_steps += max_new_tokens
            cost.weight_bytes += max_new_tokens * weights
    return cost


def predict_seconds(arch: Architecture, lengths: list[int], visual: list[int], batch: int,
                    card: dict, *, ranks: int = 1, **options) -> float:
    """Prediction on `ranks` cards (options: those of predict_cost)."""
    return seconds(predict_cost(arch, lengths, visual, batch, **options), card,
                   "score") / max(1, ranks)


def predicted_times(config, arch: Architecture, work, plan, card: tuple[str, dict]) -> dict:
    """Preflight's predicted wall time of each stage on `card` (its name and table entry), in
    seconds: training per epoch (VAL_SAMPLE's validation included) and over EPOCHS at best and
    worst of early stopping, make eval, make submit (TTA=rotate asks every row once per option
    shift)."""
    from vqa.families import family_for
    from vqa.options import SHIFTS

    card_name, card = card
    val_rows = config.val_sample
    shifts = SHIFTS if config.tta == "rotate" else 1
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
    tests = len(work.predict_lengths) if work.test_rows is None else work.test_rows
    submit = predict_seconds(arch, work.predict_lengths[:tests] * shifts,
                             work.predict_visual[:tests] * shifts,
                             plan.pred_batch_size, card, mode=config.infer_mode,
                             max_new_tokens=config.max_new_tokens, quant=config.quant,
                             windowed=windowed, ranks=ranks)
    epoch = train + validation
    # patience 1: at the earliest, the second epoch is worse than the first and training stops
    best_epochs = min(config.epochs, 1 + config.early_stopping_patience)
    return {"card": card_name, "extrapolated_from_h200": card_name != H200,
            "train_epoch_s": round(epoch, 4), "train_best_s": round(epoch * best_epochs, 4),
            "train_worst_s": round(epoch * config.epochs, 4), "best_epochs": best_epochs,
            "epochs": config.epochs, "eval_s": round(validation * shifts, 4),
            "submit_s": round(submit, 4), "efficiency": dict(EFFICIENCY),
            "element_bytes": dict(ELEMENT_BYTES), "generate_step_s": GENERATE_STEP_SECONDS}


def hours(seconds: float) -> str:
    """1 h 05 min, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def card_named(name: str, total_bytes: int | None = None) -> tuple[str, dict] | None:
    """The table's entry for a card by the name NVML gives it ("NVIDIA H200" is H200, "NVIDIA
    GeForce RTX 3090" RTX3090); None for a card the table does not know ("NVIDIA L40S" is not
    an L4). Where one name has entries of several memory sizes (A100 40GB and 80GB: the same
    matrix rate, 1,555 against 2,039 GB/s), the size in the name decides ("NVIDIA
    A100-SXM4-80GB"), else the entry nearest the card's `total_bytes`."""
    import re

    from vqa.planning.hardware import gpu_table

    table = gpu_table()
    words = [w for w in re.split(r"[\s_-]+", name.upper()) if w]
    words += [a + b for a, b in zip(words, words[1:])]  # "RTX 3090" is RTX3090
    matches = [key for key in table if key.split("-")[0].upper() in words]
    if not matches:
        return None
    sized = [key for key in matches if "-" in key and key.split("-", 1)[1].upper() in words]
    if sized:
        matches = sized
    elif total_bytes and len(matches) > 1:
        matches = [min(matches, key=lambda k: abs(table[k]["memory_mib"] * 2**20 - total_bytes))]
    key = matches[0]
    return key, table[key]


def card_for(config, machine) -> tuple[str, dict] | None:
    """The card to predict for: TARGET_GPU's, else the first GPU found when the table knows it;
    None on a CPU machine or an unknown card."""
    from vqa.planning.hardware import gpu_table

    if config.target_gpu:
        return config.target_gpu, gpu_table()[config.target_gpu]
    found = (card_named(gpu.name, gpu.total_bytes) for gpu in getattr(machine, "gpus", None) or [])
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
