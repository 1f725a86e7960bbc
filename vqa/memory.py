"""Machine probes (NVML, RAM, disk), the visual-token rule, the peak-VRAM model, and the planner.

The peak-VRAM model predicts, from a model's config.json alone, the peak memory PyTorch's caching
allocator holds (allocated and reserved) for a QLoRA training step and for inference at a given
batch. Each term is named after what holds the memory; the few coefficients that physics alone
does not fix (bytes per logit and per vision patch, the allocator's slack) were fitted to peaks
measured with random-init real-size Qwen2.5-VL-3B/7B on vqa's own train step and prediction
(the `MEASURED_PEAKS` below; docs/BENCHMARKS.md has the table and the errors).

The planner picks the largest batches whose predicted peak reserved fits the card with a margin,
then spends what the training micro-batch leaves on keeping the last decoder layers' activations
instead of recomputing them. On a CPU run memory is no constraint for the embedded model: it
keeps the CPU batches. Every choice carries the reason that the preflight report prints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from vqa.config import Config

GIB = 2**30


@dataclass
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str
    bf16: bool
    other_processes_bytes: int


@dataclass
class Machine:
    gpus: list[GPUInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_error: str | None = None
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    disk_free_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def probe_machine(artifacts_dir: Path) -> Machine:
    """GPUs through NVML (name, memory, versions, bf16, other processes), RAM and free disk."""
    import psutil

    machine = Machine()
    vm = psutil.virtual_memory()
    machine.ram_total_bytes, machine.ram_available_bytes = vm.total, vm.available
    artifacts_dir = Path(artifacts_dir)
    probe = artifacts_dir if artifacts_dir.exists() else Path(".")
    machine.disk_free_bytes = shutil.disk_usage(probe).free
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA GPU here
        machine.nvml_error = f"{type(exc).__name__}: {exc}"
        return machine
    try:
        machine.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        machine.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                others = sum(p.usedGpuMemory or 0 for p in procs)
            except pynvml.NVMLError:
                others = 0
            machine.gpus.append(GPUInfo(
                index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                total_bytes=mem.total, free_bytes=mem.free,
                compute_capability=f"{major}.{minor}", bf16=major >= 8,
                other_processes_bytes=others))
    finally:
        pynvml.nvmlShutdown()
    return machine


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_table() -> dict[str, dict]:
    """Target cards for planning a run on a card other than the one at hand."""
    text = resources.files("vqa").joinpath("gpus.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


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


# ---------------------------------------------------------------------------------------------
# The architecture, from config.json alone


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Qwen2.5-VL checkpoint that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    merge: int

    @classmethod
    def from_config(cls, name: str, config: dict) -> "Architecture":
        """From a transformers config.json (text fields nested in text_config or flat)."""
        text = {**config, **(config.get("text_config") or {})}
        vision = config["vision_config"]
        return cls(
            name=name, hidden=text["hidden_size"], intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            vocab=text["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
            vision_depth=vision["depth"], vision_hidden=vision["hidden_size"],
            vision_intermediate=vision["intermediate_size"],
            vision_out=vision.get("out_hidden_size") or text["hidden_size"],
            merge=vision.get("spatial_merge_size", 2))

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of every Linear by its module name; bitsandbytes quantizes all of them."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        vh, vi, m = self.vision_hidden, self.vision_intermediate, self.vision_hidden * self.merge ** 2
        lm = self.layers
        vd = self.vision_depth
        return {
            "q_proj": [(h, h)] * lm, "k_proj": [(h, kv)] * lm, "v_proj": [(h, kv)] * lm,
            "o_proj": [(h, h)] * lm,
            "gate_proj": [(h, self.intermediate)] * lm + [(vh, vi)] * vd,
            "up_proj": [(h, self.intermediate)] * lm + [(vh, vi)] * vd,
            "down_proj": [(self.intermediate, h)] * lm + [(vi, vh)] * vd,
            "qkv": [(vh, 3 * vh)] * vd, "proj": [(vh, vh)] * vd,
            "merger": [(m, m), (m, self.vision_out)],
        }

    @property
    def linear_params(self) -> int:
        return sum(i * o for shapes in self.linears().values() for i, o in shapes)

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (one matrix when tied): never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets: str) -> int:
        """LoRA A and B matrices on every Linear whose name is a target (the vision tower's
        MLPs share the language model's names, so the reference targets land there too)."""
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        return sum(r * (i + o) for name, shapes in self.linears().items() if name in wanted
                   for i, o in shapes)


def published_architectures() -> dict:
    """vqa/architectures.json: the published configs of the Qwen2.5-VL Instruct checkpoints."""
    return json.loads(resources.files("vqa").joinpath("architectures.json").read_text())


def architecture_for(config: Config) -> tuple[Architecture, str]:
    """The model's shapes: its config.json when it is a local folder or cached, else the
    package's table of published configs (no network needed)."""
    model_id = config.resolved_model_id
    local = Path(model_id) / "config.json"
    if local.is_file():
        return Architecture.from_config(model_id, json.loads(local.read_text())), str(local)
    try:
        from huggingface_hub import hf_hub_download

        cached = hf_hub_download(model_id, "config.json", local_files_only=True)
        return Architecture.from_config(model_id, json.loads(Path(cached).read_text())), cached
    except Exception:  # noqa: BLE001 - not cached: the published table below
        pass
    table = published_architectures()
    if model_id in table["models"]:
        shapes, common = table["models"][model_id], table["common"]
        config_json = {
            "hidden_size": shapes["hidden_size"], "intermediate_size": shapes["intermediate_size"],
            "num_hidden_layers": shapes["num_hidden_layers"],
            "num_attention_heads": shapes["num_attention_heads"],
            "num_key_value_heads": shapes["num_key_value_heads"],
            "vocab_size": shapes["vocab_size"],
            "tie_word_embeddings": shapes["tie_word_embeddings"],
            "vision_config": {**common["vision_config"],
                              "out_hidden_size": shapes["vision_out_hidden_size"]}}
        return (Architecture.from_config(model_id, config_json),
                "the package's table of published configs (vqa/architectures.json)")
    raise ValueError(f"no config.json for {model_id!r} (not a local folder, not cached, not in "
                     f"vqa/architectures.json): cannot predict its memory")


# ---------------------------------------------------------------------------------------------
# Peak memory

# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64,
# and an fp32 second-level absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Fitted to MEASURED_PEAKS (vqa's own train step and prediction). Training: least squares on
# relative error, coefficients non-negative.
TRAIN_BYTES_PER_LOGIT = 6.8  # per vocabulary entry per token row: bf16 logits, fp32 loss, grads
# The saved residual stream and one recomputed layer (see train_peak), as a share of their bf16/
# fp32 sizes: a fit, since the recomputation frees as it goes.
TRAIN_ACTIVATION_SCALE = 0.92
# The vision tower's saved and recomputed activations, per patch, per block and hidden unit
# (106 kB a patch in Qwen2.5-VL's 32 blocks of 1,280).
TRAIN_BYTES_PER_PATCH_UNIT = 2.59
# The language model's attention with a padding mask (SDPA's masked kernel materialises scores):
# bytes per score, one layer at a time, batch x heads x length x length.
TRAIN_BYTES_PER_SCORE = 0.72
TRAIN_RESERVE_OF_ACTIVATIONS = 0.16  # the caching allocator's reserve over the activations
# What one decoder layer left un-checkpointed keeps for its backward pass, per token, as a share
# of ten hidden-wide and five intermediate-wide bf16 tensors (the norms', LoRA dropouts' and
# projections' inputs; gate, up, their product and the activation). Fitted to the 7B at 448x448,
# micro-batch 16, with 7, 14 and 28 layers un-checkpointed (274 KB a token; within 1.1%).
TRAIN_KEPT_LAYER_SCALE = 1.05
# What one decoder layer whose MLP alone is checkpointed (UNCHECKPOINTED_ATTENTION) keeps, per
# token, as a share of twelve hidden-wide and two key/value-wide bf16 tensors: the norm's input
# and fp32 copies, the LoRA dropouts' and projections' inputs, query, attention output and keys
# and values (counted with saved-tensor hooks on a small model; the scale fitted on the GPU).
TRAIN_KEPT_ATTENTION_SCALE = 0.97
# Prediction: each phase's peak allocated fitted by least squares on relative error (the vision
# tower's phase: the patch scale; the language model's: the token and score terms), then the
# reserve ratios that keep the largest reserved error smallest (see MEASURED_PEAKS).
INFER_TOKEN_SCALE = 6.1  # x the bf16 hidden state, per prompt token (residual, attention)
INFER_BYTES_PER_SCORE = 0.21  # per batch x heads x length^2: the padding mask and scores
INFER_PATCH_SCALE = 17.3  # x the vision tower's bf16 hidden state, per patch of one chunk
VISION_RESERVED_RATIO = 1.14  # reserve over the transient (non-weight) part, vision phase
SCORE_RESERVED_RATIO = 1.16  # the same, the language model's phase of one-pass scoring
GENERATE_RESERVED_RATIO = 1.04  # the same for generate
PIXEL_VALUES_PER_PATCH = 3 * 2 * 14 * 14  # channels x temporal patch x 14 x 14 pixels
# The CUDA context and kernels outside PyTorch's allocator; subtracted from the card's memory.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
PLAN_MARGIN = 0.10  # the plan keeps the predicted peak this far below the usable memory

# Measured peaks (GiB) the coefficients were fitted to: `make bench-memory --cap 24GiB`
# (scripts/bench_memory.py) on an NVIDIA H200, 2026-11-29, torch 2.11, transformers 5.23,
# bitsandbytes 0.50.2, random-init real-size models, each phase in a fresh process, expandable
# allocator segments (vqa/__init__.py): vqa's own train step (LoRA r32 on q,k,v,o,gate,up,down,
# AdamW, bf16 autocast, non-reentrant checkpointing, no fp32 casts, the loss at the labelled
# positions) and predict_rows as vqa.model.prepare_for_inference sets it up (LoRA merged on the
# fly, MLPs in chunks, letters-only head and no KV cache for scoring, only the merged visual
# tokens kept). The training coefficients were fitted to the 7B rows alone; the 3B's training
# rows, measured after the fit, were held out (within 4%). The inference coefficients are
# fitted to both models' rows, each prediction's peak split at the end of the vision tower
# (the vision phase's peak fits INFER_PATCH_SCALE, the language model's the token and score
# terms, the totals the reserve ratios). 448x448 = 256 visual tokens, 1024x768 = 999,
# 1400x1400 = 2,500, capped (MAX_PIXELS=1003520) = 1,225.
SEVEN, THREE = "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"
MEASURED_PEAKS = [
    # (model, work, batch, sequence length, visual tokens per image, allocated, reserved)
    (SEVEN, 'train', 2, 373, 256, 7.46, 7.84),  # 448x448
    (SEVEN, 'train', 4, 373, 256, 7.86, 8.41),  # 448x448
    (SEVEN, 'train', 16, 373, 256, 11.24, 12.04),  # 448x448 (planner's micro-batch)
    (SEVEN, 'train', 2, 1116, 999, 8.55, 9.15),  # 1024x768
    (SEVEN, 'train', 4, 1116, 999, 10.42, 11.11),  # 1024x768
    (SEVEN, 'train', 8, 1116, 999, 14.21, 15.14),  # 1024x768 (planner's micro-batch)
    (SEVEN, 'train', 2, 2617, 2500, 11.19, 11.95),  # 1400x1400
    (SEVEN, 'train', 4, 2617, 2500, 15.75, 16.69),  # 1400x1400 (also the planner's micro-batch)
    (SEVEN, 'train', 2, 1342, 1225, 8.93, 9.54),  # 1400x1400 capped
    (SEVEN, 'train', 4, 1342, 1225, 11.22, 11.96),  # 1400x1400 capped
    (SEVEN, 'train', 8, 1342, 1225, 15.81, 16.83),  # 1400x1400 capped (planner's micro-batch)
    (SEVEN, 'generate', 2, 373, 256, 6.28, 6.34),  # 448x448
    (SEVEN, 'generate', 6, 373, 256, 6.47, 6.57),  # 448x448
    (SEVEN, 'generate', 2, 1116, 999, 6.48, 6.59),  # 1024x768
    (SEVEN, 'generate', 6, 1116, 999, 7.13, 7.29),  # 1024x768
    (SEVEN, 'generate', 2, 2617, 2500, 6.94, 7.14),  # 1400x1400
    (SEVEN, 'generate', 6, 2617, 2500, 8.67, 9.11),  # 1400x1400
    (SEVEN, 'generate', 2, 1342, 1225, 6.56, 6.65),  # 1400x1400 capped
    (SEVEN, 'generate', 6, 1342, 1225, 7.37, 7.65),  # 1400x1400 capped
    (SEVEN, 'score', 8, 373, 256, 5.42, 5.52),  # 448x448
    (SEVEN, 'score', 24, 373, 256, 5.94, 6.32),  # 448x448
    (SEVEN, 'score', 48, 373, 256, 6.94, 7.22),  # 448x448
    (SEVEN, 'score', 64, 373, 256, 7.69, 8.1),  # 448x448 (planner's)
    (SEVEN, 'score', 8, 1116, 999, 6.13, 6.34),  # 1024x768
    (SEVEN, 'score', 24, 1116, 999, 7.71, 8.2),  # 1024x768
    (SEVEN, 'score', 48, 1116, 999, 8.38, 9.31),  # 1024x768
    (SEVEN, 'score', 64, 1116, 999, 9.61, 11.19),  # 1024x768 (planner's)
    (SEVEN, 'score', 8, 2617, 2500, 7.47, 7.82),  # 1400x1400
    (SEVEN, 'score', 24, 2617, 2500, 9.1, 9.52),  # 1400x1400
    (SEVEN, 'score', 48, 2617, 2500, 13.51, 14.39),  # 1400x1400
    (SEVEN, 'score', 64, 2617, 2500, 16.45, 19.76),  # 1400x1400 (planner's)
    (SEVEN, 'score', 8, 1342, 1225, 6.46, 6.79),  # 1400x1400 capped
    (SEVEN, 'score', 24, 1342, 1225, 7.78, 8.14),  # 1400x1400 capped
    (SEVEN, 'score', 48, 1342, 1225, 9.15, 9.58),  # 1400x1400 capped
    (SEVEN, 'score', 64, 1342, 1225, 10.64, 12.38),  # 1400x1400 capped (planner's)
    (THREE, 'train', 2, 373, 256, 3.71, 3.99),  # 448x448
    (THREE, 'train', 4, 373, 256, 4.04, 4.37),  # 448x448
    (THREE, 'train', 16, 373, 256, 6.61, 7.12),  # 448x448 (planner's micro-batch)
    (THREE, 'train', 2, 1116, 999, 4.67, 5.08),  # 1024x768
    (THREE, 'train', 4, 1116, 999, 6.07, 6.55),  # 1024x768
    (THREE, 'train', 16, 1116, 999, 14.87, 15.78),  # 1024x768 (planner's micro-batch)
    (THREE, 'train', 2, 2617, 2500, 6.69, 7.29),  # 1400x1400
    (THREE, 'train', 4, 2617, 2500, 10.25, 10.91),  # 1400x1400
    (THREE, 'train', 8, 2617, 2500, 17.35, 18.41),  # 1400x1400 (planner's micro-batch)
    (THREE, 'train', 2, 1342, 1225, 4.96, 5.45),  # 1400x1400 capped
    (THREE, 'train', 4, 1342, 1225, 6.7, 7.21),  # 1400x1400 capped
    (THREE, 'train', 16, 1342, 1225, 17.39, 18.47),  # 1400x1400 capped (planner's micro-batch)
    (THREE, 'generate', 2, 373, 256, 2.62, 2.72),  # 448x448
    (THREE, 'generate', 6, 373, 256, 2.77, 2.86),  # 448x448
    (THREE, 'generate', 2, 1116, 999, 2.8, 2.94),  # 1024x768
    (THREE, 'generate', 6, 1116, 999, 3.58, 3.85),  # 1024x768
    (THREE, 'generate', 2, 2617, 2500, 3.38, 3.52),  # 1400x1400
    (THREE, 'generate', 6, 2617, 2500, 5.33, 5.83),  # 1400x1400
    (THREE, 'generate', 2, 1342, 1225, 2.89, 3.03),  # 1400x1400 capped
    (THREE, 'generate', 6, 1342, 1225, 3.84, 4.01),  # 1400x1400 capped
    (THREE, 'score', 8, 373, 256, 2.78, 2.88),  # 448x448
    (THREE, 'score', 24, 373, 256, 3.51, 3.64),  # 448x448
    (THREE, 'score', 48, 373, 256, 4.61, 5.04),  # 448x448
    (THREE, 'score', 64, 373, 256, 5.34, 5.88),  # 448x448 (planner's)
    (THREE, 'score', 8, 1116, 999, 3.83, 4.12),  # 1024x768
    (THREE, 'score', 24, 1116, 999, 5.35, 5.89),  # 1024x768
    (THREE, 'score', 48, 1116, 999, 5.79, 6.24),  # 1024x768
    (THREE, 'score', 64, 1116, 999, 6.06, 6.51),  # 1024x768 (planner's)
    (THREE, 'score', 8, 2617, 2500, 5.13, 5.63),  # 1400x1400
    (THREE, 'score', 24, 2617, 2500, 5.82, 6.24),  # 1400x1400
    (THREE, 'score', 48, 2617, 2500, 7.91, 8.88),  # 1400x1400
    (THREE, 'score', 64, 2617, 2500, 9.75, 10.96),  # 1400x1400 (planner's)
    (THREE, 'score', 8, 1342, 1225, 4.15, 4.5),  # 1400x1400 capped
    (THREE, 'score', 24, 1342, 1225, 5.41, 5.95),  # 1400x1400 capped
    (THREE, 'score', 48, 1342, 1225, 5.91, 6.36),  # 1400x1400 capped
    (THREE, 'score', 64, 1342, 1225, 6.23, 6.84),  # 1400x1400 capped (planner's)
]

# Training with the last decoder layers not checkpointed (UNCHECKPOINTED_LAYERS), same card:
# on 2026-11-29 the 7B at 448x448, micro-batch 16, with 7, 14 and 28 layers kept (what
# TRAIN_KEPT_LAYER_SCALE was fitted to), then the planner's eight choices under the 24 GiB cap
# (`BENCH_MODELS=7B BENCH_WORK=train make bench-memory CAP=24GiB`, and the 3B's, held out); on
# 2026-11-30 the same 7B batch with 14 and 28 layers checkpointing only their MLP
# (UNCHECKPOINTED_ATTENTION; BENCH_UNCHECKPOINTED=0,0+14,0+28, what TRAIN_KEPT_ATTENTION_SCALE
# was fitted to: the 28's allocated), then the planner's eight choices with both.
MEASURED_KEPT_PEAKS = [
    # (model, micro-batch, sequence length, visual tokens per image, layers kept, attention
    # blocks kept, allocated, reserved)
    (SEVEN, 16, 373, 256, 7, 0, 20.79, 21.20),
    (SEVEN, 16, 373, 256, 14, 0, 31.43, 31.89),
    (SEVEN, 16, 373, 256, 28, 0, 52.75, 53.16),
    (SEVEN, 16, 373, 256, 6, 0, 19.11, 19.58),  # 448x448 (planner's, 2026-11-29)
    (SEVEN, 8, 1116, 999, 3, 0, 19.11, 19.71),  # 1024x768 (planner's, 2026-11-29)
    (SEVEN, 4, 2617, 2500, 2, 0, 18.81, 19.47),  # 1400x1400 (planner's, 2026-11-29)
    (SEVEN, 8, 1342, 1225, 2, 0, 18.95, 19.61),  # 1400x1400 capped (planner's, 2026-11-29)
    (THREE, 16, 373, 256, 16, 0, 19.98, 20.30),  # 448x448 (planner's, 2026-11-29)
    (THREE, 16, 1116, 999, 2, 0, 17.91, 18.55),  # 1024x768 (planner's, 2026-11-29)
    (THREE, 8, 2617, 2500, 1, 0, 17.83, 18.49),  # 1400x1400 (planner's, 2026-11-29)
    (THREE, 16, 1342, 1225, 1, 0, 17.86, 18.55),  # 1400x1400 capped (planner's, 2026-11-29)
    (SEVEN, 16, 373, 256, 0, 14, 17.60, 18.33),
    (SEVEN, 16, 373, 256, 0, 28, 24.50, 25.21),
    (SEVEN, 16, 373, 256, 6, 3, 20.58, 21.05),  # 448x448 (planner's, 2026-11-30)
    (SEVEN, 8, 1116, 999, 3, 1, 19.85, 20.41),  # 1024x768 (planner's, 2026-11-30)
    (SEVEN, 4, 2617, 2500, 2, 1, 19.68, 20.31),  # 1400x1400 (planner's, 2026-11-30)
    (SEVEN, 8, 1342, 1225, 2, 1, 19.83, 20.47),  # 1400x1400 capped (planner's, 2026-11-30)
    (THREE, 16, 373, 256, 16, 2, 20.54, 20.84),  # 448x448 (planner's, 2026-11-30)
    (THREE, 16, 1116, 999, 2, 2, 19.59, 20.21),  # 1024x768 (planner's, 2026-11-30)
    (THREE, 8, 2617, 2500, 1, 1, 18.82, 19.49),  # 1400x1400 (planner's, 2026-11-30)
    (THREE, 16, 1342, 1225, 1, 1, 18.87, 19.55),  # 1400x1400 capped (planner's, 2026-11-30)
]


@dataclass
class Estimate:
    """A predicted peak, in bytes, with the terms it is made of."""

    allocated: float
    reserved: float
    terms: dict[str, float]

    def gib(self) -> dict:
        return {"allocated_gib": round(self.allocated / GIB, 3),
                "reserved_gib": round(self.reserved / GIB, 3),
                "terms_gib": {k: round(v / GIB, 3) for k, v in self.terms.items()}}


def _weights(arch: Architecture, quant: str) -> float:
    per_param = NF4_BYTES_PER_PARAM if quant == "4bit" else 2
    return arch.linear_params * per_param


def train_peak(arch: Architecture, *, tokens: int, patches: int, quant: str = "4bit",
               lora_r: int = 32, lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,"
               "up_proj,down_proj", logit_rows: int | None = None,
               fp32_casts: bool = True, length: int | None = None,
               uncheckpointed: int = 0, attention_kept: int = 0) -> Estimate:
    """One QLoRA step: `tokens` = micro-batch x padded length, `patches` = vision patches of
    the micro-batch's images (4 per visual token). `logit_rows`: positions that get
    full-vocabulary logits (None = every token, as the model's own loss does; vqa's loss keeps
    only the labelled end of each row). `fp32_casts`: prepare_model_for_kbit_training's fp32
    copies of the unquantized weights (the reference) or not (bf16 kept). `length`: the padded
    sequence length (tokens / rows; None = one row of `tokens`). `uncheckpointed`: decoder
    layers (the last ones) that keep their activations instead of recomputing them;
    `attention_kept`: layers below those that keep their attention's and recompute their MLP."""
    lora = arch.lora_params(lora_r, lora_targets)
    upcast = quant == "4bit" and fp32_casts
    kept = min(uncheckpointed, arch.layers)
    attention = min(attention_kept, arch.layers - kept)
    # The backward pass frees the un-checkpointed (last) layers' activations before it recomputes
    # the first checkpointed layer, so the peak holds one or the other, not both. The layers
    # that keep only their attention's sit below them and hold it until their own backward.
    recomputed = TRAIN_ACTIVATION_SCALE * tokens * 12 * arch.intermediate
    layer_activations = max(recomputed, kept * tokens * TRAIN_KEPT_LAYER_SCALE * 2
                            * (10 * arch.hidden + 5 * arch.intermediate))
    kv_width = arch.kv_heads * arch.hidden // arch.heads
    attention_activations = (attention * tokens * TRAIN_KEPT_ATTENTION_SCALE * 2
                             * (12 * arch.hidden + 2 * kv_width))
    terms = {
        "base weights (4-bit NF4)" if quant == "4bit" else "base weights (bf16)":
            _weights(arch, quant),
        # prepare_model_for_kbit_training casts what stays unquantized to fp32; bf16 otherwise
        "embeddings and lm_head": arch.embedding_params * (4 if upcast else 2),
        "autocast's bf16 copy of lm_head": arch.vocab * arch.hidden * 2 if upcast else 0,
        "LoRA weights, gradients, AdamW states (fp32)": lora * 16,
        "dequantized weight buffers": 2 * arch.hidden * arch.intermediate * 2,
        # the residual stream saved at each layer (fp32 behind fp32 embeddings, else bf16)
        "checkpointed activations": TRAIN_ACTIVATION_SCALE * tokens
        * (4 if upcast else 2) * arch.layers * arch.hidden,
        # one layer's MLP recomputed, or the un-checkpointed layers' activations
        "layer activations in the backward pass": layer_activations,
        "attention activations kept (MLP recomputed)": attention_activations,
        "language model attention scores": tokens * (length or tokens) * arch.heads
        * TRAIN_BYTES_PER_SCORE,
        "logits and loss": (tokens if logit_rows is None else logit_rows) * arch.vocab
        * TRAIN_BYTES_PER_LOGIT,
        "vision tower activations": patches * TRAIN_BYTES_PER_PATCH_UNIT * arch.vision_depth
        * arch.vision_hidden,
    }
    allocated = sum(terms.values())
    # The un-checkpointed layers' activations (and attention blocks') are made and freed in stack
    # order: they add next to nothing to the reserve (measured), so it is sized on the
    # recomputed layer.
    activations = terms["checkpointed activations"] + recomputed + sum(
        terms[k] for k in ("vision tower activations", "language model attention scores"))
    terms["allocator reserve"] = activations * TRAIN_RESERVE_OF_ACTIVATIONS
    return Estimate(allocated, allocated + terms["allocator reserve"], terms)


def vision_chunk(patches_per_image: list[int]) -> int:
    """The most patches the vision tower holds at once for these images (vqa/speed.py runs it
    over chunks of whole images of at most VISION_CHUNK_PATCHES)."""
    from vqa.speed import VISION_CHUNK_PATCHES, image_groups

    groups = image_groups(patches_per_image, VISION_CHUNK_PATCHES)
    return max((sum(patches_per_image[a:b]) for a, b in groups), default=0)


def infer_peak(arch: Architecture, *, batch: int, tokens: int, vision_patches: int, mode: str,
               batch_patches: int | None = None, max_new_tokens: int = 16, quant: str = "4bit",
               lora_r: int = 32, lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,"
               "up_proj,down_proj") -> Estimate:
    """The peak of one prediction batch: the larger of its two phases (`infer_phases`)."""
    phases = infer_phases(arch, batch=batch, tokens=tokens, vision_patches=vision_patches,
                          mode=mode, batch_patches=batch_patches, max_new_tokens=max_new_tokens,
                          quant=quant, lora_r=lora_r, lora_targets=lora_targets)
    peak = max(phases.values(), key=lambda phase: phase.reserved)
    return Estimate(max(phase.allocated for phase in phases.values()), peak.reserved, peak.terms)


def infer_phases(arch: Architecture, *, batch: int, tokens: int, vision_patches: int, mode: str,
                 batch_patches: int | None = None, max_new_tokens: int = 16,
                 quant: str = "4bit", lora_r: int = 32, lora_targets: str = "q_proj,k_proj,"
                 "v_proj,o_proj,gate_proj,up_proj,down_proj") -> dict[str, Estimate]:
    """One prediction batch as vqa.model.prepare_for_inference sets it up: `tokens` = batch x
    padded prompt length, `batch_patches` = the batch's vision patches (4 per visual token),
    `vision_patches` = the most the vision tower holds at once (it runs over chunks of whole
    images of at most VISION_CHUNK_PATCHES: `vision_chunk`); `mode` score (lm_head cut to the
    four letters, no KV cache) or generate (whole lm_head, KV cache).

    The forward has two phases that do not overlap: the vision tower (one chunk's activations,
    beside the batch's input embeddings and the merged tokens made so far), then the language
    model. Each phase's estimate; the batch's pixels are held through both."""
    from vqa.speed import MLP_CHUNK_TOKENS

    batch_patches = vision_patches if batch_patches is None else batch_patches
    input_embeddings = arch.vocab * arch.hidden
    static = {
        "base weights (4-bit NF4)" if quant == "4bit" else "base weights (bf16)":
            _weights(arch, quant),
        "input embeddings (bf16)": input_embeddings * 2,
        # untied lm_head; one-pass scoring keeps only the letters' rows
        "lm_head (bf16)": 0 if mode == "score" else (arch.embedding_params - input_embeddings) * 2,
        "LoRA weights (bf16)": arch.lora_params(lora_r, lora_targets) * 2,
    }
    pixels = batch_patches * PIXEL_VALUES_PER_PATCH * 2  # held through both phases
    vision = {
        "the batch's input embeddings": tokens * arch.hidden * 2,
        "merged visual tokens": batch_patches / arch.merge ** 2 * arch.vision_out * 2,
        "vision tower activations (one chunk)": vision_patches * INFER_PATCH_SCALE * 2
        * arch.vision_hidden,
    }
    head_dim = arch.hidden // arch.heads
    length = tokens / max(batch, 1)
    language = {
        # the fused MLP's dense gate, up and down, and one more while the next is made
        "dense MLP weights": 4 * arch.hidden * arch.intermediate * 2,
        "decoder activations": tokens * INFER_TOKEN_SCALE * 2 * arch.hidden,
        # SDPA's masked kernel under left padding: one layer's scores, batch x heads x L x L
        "language model attention scores": batch * arch.heads * length ** 2
        * INFER_BYTES_PER_SCORE,
        "MLP chunk": min(tokens, MLP_CHUNK_TOKENS) * 3 * arch.intermediate * 2,
        "last-position logits (fp32)": batch * (4 if mode == "score" else arch.vocab) * 4,
    }
    if mode == "generate":
        language["KV cache"] = (batch * (length + max_new_tokens) * arch.layers * 2
                                * arch.kv_heads * head_dim * 2)
    weights = sum(static.values())
    phases = {}
    for name, terms, ratio in (
            ("vision tower", vision, VISION_RESERVED_RATIO),
            ("language model", language,
             SCORE_RESERVED_RATIO if mode == "score" else GENERATE_RESERVED_RATIO)):
        transient = pixels + sum(terms.values())
        phases[name] = Estimate(weights + transient, weights + transient * ratio,
                                {**static, "pixel values (bf16)": pixels, **terms,
                                 "allocator reserve": transient * (ratio - 1)})
    return phases


# ---------------------------------------------------------------------------------------------
# The planner


@dataclass
class Workload:
    """What the data makes the model do: per usable row, its sequence length (prompt, image
    tokens and answer) and its visual tokens, under the run's pixel bounds."""

    train_lengths: list[int]
    train_visual: list[int]
    test_lengths: list[int]
    test_visual: list[int]

    @staticmethod
    def worst_batch(lengths: list[int], visual: list[int], batch: int) -> tuple[int, int]:
        """(tokens, patches) of the heaviest batch a sampler can form: the `batch` longest rows
        padded to the longest, with the `batch` largest images."""
        if not lengths:
            return 0, 0
        batch = min(batch, len(lengths))
        longest = max(lengths)
        largest = sorted(visual, reverse=True)[:batch]
        return batch * longest, 4 * sum(largest)


@dataclass
class Budget:
    name: str
    usable_bytes: int  # memory PyTorch may reserve: the card's less the CUDA context and others

    @property
    def limit_bytes(self) -> float:
        return self.usable_bytes * (1 - PLAN_MARGIN)


def parse_memory(text: str) -> int:
    """'24GiB', '24GB', '24000MiB', '24' (GiB) -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"TARGET_GPU_MEMORY={text!r}: expected e.g. 24GiB, 24GB or 23028MiB")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    return int(value * scale)


def target_card_memory(config: Config) -> tuple[str, int] | None:
    """(name, total bytes) of the card named by TARGET_GPU_MEMORY or TARGET_GPU, else None;
    ValueError for a size that does not parse or a card not in the table."""
    if config.target_gpu_memory:
        return f"TARGET_GPU_MEMORY={config.target_gpu_memory}", parse_memory(
            config.target_gpu_memory)
    if config.target_gpu:
        table = gpu_table()
        key = next((k for k in table if k.lower() == config.target_gpu.lower()), None)
        if key is None:
            raise ValueError(f"TARGET_GPU={config.target_gpu!r}: not in the table; known: "
                             f"{', '.join(table)} (or set TARGET_GPU_MEMORY=24GiB)")
        total = table[key]["memory_mib"] * 2**20
        return f"TARGET_GPU={key} ({total / GIB:.1f} GiB)", total
    return None


def budget_for(config: Config, machine: Machine | None) -> Budget | None:
    """The memory to plan for: a target card when one is named, else the GPUs found (the least
    free of those the run uses), else None (a CPU run)."""
    target = target_card_memory(config)
    if target is not None:
        name, total = target
        return Budget(name, total - CUDA_CONTEXT_BYTES)
    if machine is not None and machine.gpus:
        used = machine.gpus[:max(1, config.nproc)]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every rank must pick the same batch, and the ranks' own contexts change what is
            # free while they start: plan all of them on the smallest card's total.
            gpu = min(used, key=lambda g: g.total_bytes)
            return Budget(f"GPU {gpu.index} {gpu.name} ({gpu.total_bytes / GIB:.1f} GiB)",
                          gpu.total_bytes - CUDA_CONTEXT_BYTES)
        gpu = min(used, key=lambda g: g.free_bytes)
        return Budget(f"GPU {gpu.index} {gpu.name} ({gpu.free_bytes / GIB:.1f} GiB free of "
                      f"{gpu.total_bytes / GIB:.1f})", gpu.free_bytes - CUDA_CONTEXT_BYTES)
    return None


@dataclass
class Plan:
    per_device_batch: int
    gradient_accumulation: int
    pred_batch_size: int
    reasons: list[str]
    uncheckpointed_layers: int = 0  # the last decoder layers trained without checkpointing
    uncheckpointed_attention: int = 0  # the layers below those that checkpoint only their MLP
    verdict: str = "fits"  # fits | will run out of memory | not planned ... | CPU run
    budget: dict | None = None
    train_peak: dict | None = None
    predict_peak: dict | None = None
    candidates: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)
    suggested_max_pixels: int | None = None


def _pick(knob: str, user_value: int | None, default: int, why: str,
          reasons: list[str]) -> int:
    if user_value:
        reasons.append(f"{knob}={user_value} set by the user")
        return user_value
    reasons.append(f"{knob}={default}: {why}")
    return default


def _cpu_plan(config: Config, reasons: list[str]) -> tuple[int, int]:
    # The largest divisor of the effective batch up to 16, so accumulation keeps it exact.
    effective = config.effective_batch_size
    cpu_batch = max(d for d in range(1, min(effective, 16) + 1) if effective % d == 0)
    per_device = _pick("PER_DEVICE_BATCH", config.per_device_batch, cpu_batch,
                       "CPU run, RAM is no constraint for it", reasons)
    pred = _pick("PRED_BATCH_SIZE", config.pred_batch_size, 32, "CPU run", reasons)
    return per_device, pred


# Beyond this, scoring is no faster a row (batch 32 to 64: flat), and larger is slower: 3B,
# 448x448, batch 1,388 (all that fits a 24 GiB card) took 0.0252 s a row against 0.0229 in
# batches of 64 (docs/BENCHMARKS.md).
MAX_PRED_BATCH = 64


def train_estimate(config: Config, arch: Architecture, work: Workload, batch: int,
                   uncheckpointed: int = 0, attention: int = 0) -> Estimate:
    """The training peak at micro-batch `batch` (the last `uncheckpointed` decoder layers keeping
    their activations, the `attention` below them their attention's) on the heaviest batch of
    the workload, under the run's settings."""
    from vqa.model import FP32_CASTS
    from vqa.speed import LABEL_WINDOW

    tokens, patches = Workload.worst_batch(work.train_lengths, work.train_visual, batch)
    rows = min(batch, max(1, len(work.train_lengths)))
    return train_peak(arch, tokens=tokens, patches=patches, quant=config.quant,
                      lora_r=config.lora_r, lora_targets=config.lora_targets,
                      logit_rows=rows * LABEL_WINDOW, fp32_casts=FP32_CASTS,
                      length=tokens // rows, uncheckpointed=uncheckpointed,
                      attention_kept=attention)


def infer_estimate(config: Config, arch: Architecture, work: Workload, batch: int) -> Estimate:
    """The prediction peak (INFER_MODE) at batch `batch` on the workload's longest rows."""
    tokens, patches = Workload.worst_batch(work.test_lengths, work.test_visual, batch)
    largest = [4 * v for v in sorted(work.test_visual, reverse=True)[:batch]]
    return infer_peak(arch, batch=min(batch, max(1, len(work.test_lengths))), tokens=tokens,
                      vision_patches=vision_chunk(largest), batch_patches=patches,
                      mode=config.infer_mode,
                      max_new_tokens=config.max_new_tokens, quant=config.quant,
                      lora_r=config.lora_r, lora_targets=config.lora_targets)


def _gpu_plan(config: Config, arch: Architecture, work: Workload, budget: Budget,
              plan: Plan) -> tuple[int, int]:
    reasons, limit = plan.reasons, budget.limit_bytes
    per_rank = config.effective_batch_size // config.nproc
    train = {b: train_estimate(config, arch, work, b)
             for b in range(1, per_rank + 1) if per_rank % b == 0} or {
        1: train_estimate(config, arch, work, 1)}
    # The prediction batch's own limits: MAX_PRED_BATCH, or every row when there are fewer.
    rows = max(1, len(work.test_lengths))
    ceiling = min(MAX_PRED_BATCH, rows)
    ceiling_why = (f"{config.infer_mode} throughput does not grow beyond it (MAX_PRED_BATCH)"
                   if ceiling == MAX_PRED_BATCH else f"it holds every row to predict ({rows})")
    infer = {b: infer_estimate(config, arch, work, b) for b in range(1, ceiling + 1)}
    gib = lambda e: f"{e.reserved / GIB:.1f} GiB"  # noqa: E731
    fits_train = [b for b, e in train.items() if e.reserved <= limit]
    fits_pred = [b for b, e in infer.items() if e.reserved <= limit]
    plan.candidates = (
        [{"work": "train", "batch": b, **e.gib()} for b, e in train.items()]
        + [{"work": config.infer_mode, "batch": b, **infer[b].gib()}
           for b in (1, 2, 4, 8, 16, 24, 32, 48, 64) if b in infer])
    where = (f"{budget.name}: {budget.usable_bytes / GIB:.1f} GiB usable after the CUDA "
             f"context, planned to {limit / GIB:.1f} GiB ({PLAN_MARGIN:.0%} margin)")
    reasons.append(where)
    # What stops each batch from growing: memory (the next candidate's predicted peak), or a
    # limit of its own (the effective batch, MAX_PRED_BATCH, the rows to predict).
    best_train, best_pred = max(fits_train or [1]), max(fits_pred or [1])
    above = [b for b in train if b > best_train]
    train_stop = (f"the next divisor, {min(above)}, is predicted at {gib(train[min(above)])}"
                  if above else f"it is the whole effective batch per GPU ({per_rank})")
    pred_stop = (f"{best_pred + 1} is predicted at {infer[best_pred + 1].reserved / GIB:.2f} GiB"
                 if best_pred < ceiling else f"{best_pred} is the ceiling: {ceiling_why}")
    per_device = _pick(
        "PER_DEVICE_BATCH", config.per_device_batch, best_train,
        f"the largest micro-batch dividing the effective batch whose predicted peak fits "
        f"({gib(train[best_train])}); {train_stop}"
        if fits_train else "nothing fits; see the suggested MAX_PIXELS", reasons)
    kept, attention = (_kept_layers(config, arch, work, per_device, limit, reasons)
                       if fits_train else (0, 0))
    pred = _pick("PRED_BATCH_SIZE", config.pred_batch_size, best_pred,
                 f"the largest {config.infer_mode} batch whose predicted peak on the longest test "
                 f"rows fits ({gib(infer[best_pred])}); {pred_stop}"
                 if fits_pred else "nothing fits; see the suggested MAX_PIXELS", reasons)
    # A user's batch may lie outside the candidates (not a divisor, or beyond the ceiling).
    train_at = train_estimate(config, arch, work, per_device, kept, attention)
    pred_at = infer.get(pred) or infer_estimate(config, arch, work, pred)
    plan.train_peak, plan.predict_peak = train_at.gib(), pred_at.gib()
    plan.uncheckpointed_layers, plan.uncheckpointed_attention = kept, attention
    if kept or attention:
        plan.candidates.append({"work": f"train, {kept_words(kept, attention)}",
                                "batch": per_device, **train_at.gib()})
    reasons.append(f"predicted peak reserved: train {gib(train_at)} at micro-batch "
                   f"{per_device} on its heaviest batch, {config.infer_mode} {gib(pred_at)} "
                   f"at batch {pred}")
    for knob, value, estimate in (
            ("PER_DEVICE_BATCH", config.per_device_batch, train_at),
            ("UNCHECKPOINTED_LAYERS", config.uncheckpointed_layers, train_at),
            ("UNCHECKPOINTED_ATTENTION", config.uncheckpointed_attention, train_at),
            ("PRED_BATCH_SIZE", config.pred_batch_size, pred_at)):
        if value and estimate.reserved > budget.usable_bytes:
            plan.warnings.append(f"{knob}={value} is predicted to need {gib(estimate)}, more than "
                                 f"the {budget.usable_bytes / GIB:.1f} GiB usable: it will run "
                                 f"out of memory (the OOM back-off then splits batches)")
    if not fits_train or not fits_pred:
        work_name = "training at micro-batch 1" if not fits_train else f"{config.infer_mode} at batch 1"
        worst = train[1] if not fits_train else infer[1]
        plan.verdict = "will run out of memory"
        plan.blocking.append(f"{work_name} is predicted to peak at {gib(worst)}, more than the "
                             f"{limit / GIB:.1f} GiB planned on {budget.name}")
    return per_device, pred


def kept_words(layers: int, attention: int) -> str:
    """'last 6 layers kept', '... + 3 attention blocks', for the candidates table."""
    words = f"last {layers} layers kept" if layers else ""
    if attention:
        words += f"{' + ' if words else ''}{attention} attention blocks kept below"
    return words


def _most_that_fit(peak, most: int, limit: float) -> tuple[int, float, float | None]:
    """The largest n in 0..most whose predicted reserved `peak(n)` (GiB, growing with n) fits
    `limit` (bytes; 0 when none does), its peak, and the next count's (None when n = most)."""
    fits, at = 0, peak(0)
    while fits < most:
        following = peak(fits + 1)
        if following * GIB > limit:
            return fits, at, following
        fits, at = fits + 1, following
    return fits, at, None


def _kept_layers(config: Config, arch: Architecture, work: Workload, batch: int, limit: float,
                 reasons: list[str]) -> tuple[int, int]:
    """UNCHECKPOINTED_LAYERS and UNCHECKPOINTED_ATTENTION: the user's, else as many decoder
    layers as the memory the micro-batch leaves can hold, each keeping its activations for the
    backward pass instead of recomputing its forward there; then, in what those leave, as many
    layers below them as can keep their attention's activations and recompute only the MLP."""
    def beyond(count: int, peak: float) -> str:
        return f"{count} would need {peak:.2f} GiB, more than the {limit / GIB:.2f} planned"

    if config.uncheckpointed_layers is not None:
        reasons.append(f"UNCHECKPOINTED_LAYERS={config.uncheckpointed_layers} set by the user")
        kept = config.uncheckpointed_layers
    else:
        kept, at, following = _most_that_fit(
            lambda k: train_estimate(config, arch, work, batch, k).reserved / GIB,
            arch.layers, limit)
        if following is None:
            why = (f"the memory micro-batch {batch} leaves holds every decoder layer's "
                   f"activations ({at:.1f} GiB): gradient checkpointing is off")
        else:
            held = (f"keeps the activations of the last {kept} of {arch.layers} decoder layers "
                    f"for the backward pass instead of recomputing them ({at:.1f} GiB)"
                    if kept else "holds no decoder layer's activations: each is recomputed")
            why = f"the memory micro-batch {batch} leaves {held}; {beyond(kept + 1, following)}"
        reasons.append(f"UNCHECKPOINTED_LAYERS={kept}: {why}")
    if config.uncheckpointed_attention is not None:
        reasons.append(f"UNCHECKPOINTED_ATTENTION={config.uncheckpointed_attention} set by the "
                       f"user")
        return kept, config.uncheckpointed_attention
    below = max(0, arch.layers - min(kept, arch.layers))
    attention, at, following = _most_that_fit(
        lambda j: train_estimate(config, arch, work, batch, kept, j).reserved / GIB, below, limit)
    if following is None:
        why = (f"every layer below the kept ones keeps its attention's activations ({at:.1f} GiB)"
               if below else "no layer is checkpointed")
    else:
        why = (f"{attention} layers below the kept ones keep their attention's activations and "
               f"recompute only their MLP ({at:.1f} GiB); {beyond(attention + 1, following)}")
    reasons.append(f"UNCHECKPOINTED_ATTENTION={attention}: {why}")
    return kept, attention


def plan_batch_sizes(config: Config, machine: Machine | None = None,
                     arch: Architecture | None = None, work: Workload | None = None) -> Plan:
    """Batch sizes for train and predict: the user's when set, else the largest that fit.

    With a GPU (found, or named by TARGET_GPU / TARGET_GPU_MEMORY), the architecture and the
    data's workload, the choice comes from the peak-VRAM model; without the data scan on a GPU,
    the reference's micro-batch 2; on CPU, batches sized for the CPU.
    """
    import torch

    plan = Plan(0, 0, 0, [])
    reasons = plan.reasons
    budget = budget_for(config, machine)
    if budget is not None and arch is not None and work is not None:
        plan.budget = {"name": budget.name, "usable_gib": round(budget.usable_bytes / GIB, 2),
                       "planned_gib": round(budget.limit_bytes / GIB, 2),
                       "margin": PLAN_MARGIN}
        per_device, pred = _gpu_plan(config, arch, work, budget, plan)
    elif budget is not None or torch.cuda.is_available():
        plan.verdict = "not planned (no architecture or data scan)"
        per_device = _pick("PER_DEVICE_BATCH", config.per_device_batch,
                           min(2, config.effective_batch_size),
                           "the reference micro-batch (no data scan to plan from)", reasons)
        pred = _pick("PRED_BATCH_SIZE", config.pred_batch_size, 8,
                     "a conservative batch (no data scan to plan from)", reasons)
    else:
        plan.verdict = "CPU run"
        per_device, pred = _cpu_plan(config, reasons)
    if plan.budget is None:  # nothing planned the memory: the user's layers, else all recomputed
        plan.uncheckpointed_layers = config.uncheckpointed_layers or 0
        plan.uncheckpointed_attention = config.uncheckpointed_attention or 0
    ranks = config.nproc
    accumulation = max(1, math.ceil(config.effective_batch_size / (per_device * ranks)))
    if machine is not None and machine.gpus:
        reasons.append(f"{len(machine.gpus)} GPU(s) found; the plan is per GPU")
        if ranks > len(machine.gpus):
            reasons.append(f"NPROC={ranks} exceeds the {len(machine.gpus)} GPU(s) found: "
                           f"set NPROC={len(machine.gpus)} or fewer")
    if ranks > 1:
        reasons.append(f"NPROC={ranks}: micro-batch {per_device} x accumulation {accumulation} "
                       f"x {ranks} ranks = {per_device * accumulation * ranks} per optimizer "
                       f"step; each rank predicts every {ranks}th batch")
    if per_device * accumulation * ranks != config.effective_batch_size:
        reasons.append(f"EFFECTIVE_BATCH_SIZE={config.effective_batch_size} is not a multiple of "
                       f"micro-batch x ranks: {per_device * accumulation * ranks} is used")
    plan.per_device_batch, plan.gradient_accumulation, plan.pred_batch_size = (
        per_device, accumulation, pred)
    return plan
