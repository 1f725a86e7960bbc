"""Loading the processor and model (4-bit NF4 or not) and attaching LoRA: one place for the
embedded tiny model and every checkpoint of the families in vqa/families/ (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL), hub id or local folder, through transformers' Auto classes."""

from __future__ import annotations

from pathlib import Path

import torch

from vqa import distributed
from vqa.config import Config
from vqa.io import file_fingerprint
from vqa.kernels import use_fused_kernels
from vqa.families import family_for
from vqa.planning.shapes import cached_config
from vqa.speed import (chunk_vision_tower, fuse_inference_linears, fuse_inference_mlps,
                       letters_only_head, use_grouped_vision_attention)


class ModelError(RuntimeError):
    """The model or processor cannot be loaded; the message says what to do."""


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return "cuda", torch.bfloat16 if major >= 8 else torch.float16
    return "cpu", torch.float32


def uses_4bit(config: Config) -> bool:
    """4-bit NF4 only on CUDA: bitsandbytes' CPU path broke a training forward after an eval one."""
    return config.quant == "4bit" and torch.cuda.is_available()


def _missing_model_message(model_id: str, exc: Exception) -> str:
    if Path(model_id).exists() or model_id.startswith((".", "/")):
        return f"cannot load model from {model_id}: {exc}".splitlines()[0]
    return (f"cannot load {model_id!r} from the hub or the local cache ({type(exc).__name__}); "
            f"without network, download it elsewhere and set MODEL_ID to the mounted folder")


def _hub_unreachable(model_id: str) -> str | None:
    """Why the hub cannot be reached for a hub id that is not in the local cache, else None.

    Without this, a host with no network retries every file with back-off for minutes before
    failing. A local folder, HF_HUB_OFFLINE=1 and a proxy setting skip the probe.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if Path(model_id).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return None
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model_id, local_files_only=True)
        return None  # cached: from_pretrained needs no network
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a hub id
        pass
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return None
    except OSError as exc:
        return f"{endpoint.hostname} unreachable ({exc.strerror or exc})"


def _check_hub(model_id: str) -> None:
    reason = _hub_unreachable(model_id)
    if reason:
        raise ModelError(f"cannot load {model_id!r}: not in the local cache and {reason}; "
                         f"without network, download it elsewhere and set MODEL_ID to the "
                         f"mounted folder")


# What a model folder's weights are stored in (one file, or shards beside an index).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def model_fingerprint(model_id: str) -> dict:
    """What identifies a base model's weights: in a local folder, the sha256 of every weight
    file (shards and index included); for a hub id, the commit of the cached snapshot (None
    until it is downloaded: the hub's files are stored by content, so the commit pins them)."""
    folder = Path(model_id)
    if folder.is_dir():
        files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern)})
        return {"weights": {p.name: file_fingerprint(p) for p in files}}
    cached = cached_config(model_id)
    return {"hub_id": model_id, "commit": cached.parent.name if cached is not None else None}


def load_processor(config: Config):
    from transformers import AutoProcessor

    model_id = config.resolved_model_id
    _check_hub(model_id)
    model_family(model_id)  # a family vqa does not serve stops here, in one line
    kwargs = {}
    if config.min_pixels:
        kwargs["min_pixels"] = config.min_pixels
    if config.max_pixels:
        kwargs["max_pixels"] = config.max_pixels
    try:
        processor = AutoProcessor.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_missing_model_message(model_id, exc)) from None
    if not hasattr(processor, "image_processor"):
        raise ModelError(f"{model_id}: AutoProcessor returned {type(processor).__name__}, "
                         f"not a vision processor (is torchvision installed?)")
    return processor


def model_family(model_id: str):
    """The family (vqa/families/) of a local or cached model, from its config.json's
    model_type; None when there is no config.json here yet (a hub id still to download).
    UnsupportedModel (one line) for a family vqa does not serve."""
    import json

    local = Path(model_id) / "config.json"
    found = local if local.is_file() else cached_config(model_id)
    if found is None:
        return None
    try:
        model_type = json.loads(Path(found).read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{found}: cannot read the model's config.json ({exc})") from None
    return family_for(model_type, str(found))


def load_model(config: Config, *, for_training: bool):
    """The base model on the right device, through transformers' Auto class for every family
    (vqa/families/); 4-bit NF4 with double quantisation under QUANT=4bit."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    device, dtype = device_and_dtype()
    kwargs: dict = {"dtype": dtype}
    if uses_4bit(config):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        # Each rank holds its own quantized copy on its own GPU (DDP).
        kwargs["device_map"] = {"": distributed.world().local_rank}
    model_id = config.resolved_model_id
    model_family(model_id)  # a family vqa does not serve stops here, in one line
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_missing_model_message(model_id, exc)) from None
    family = family_for(model.config.model_type, model_id)  # downloaded just now: checked too
    if not uses_4bit(config):
        model.to(f"cuda:{distributed.world().local_rank}" if device == "cuda" else device)
    model.config.use_cache = not for_training
    use_grouped_vision_attention(model)  # exact; one attention call per window size (speed.py)
    if config.fused_kernels and torch.cuda.is_available():
        use_fused_kernels(model, family)  # Liger's RMSNorm, rope, SiLU-mul (kernels.py)
    return model


# prepare_model_for_kbit_training casts every unquantized weight (embeddings, lm_head, norms,
# biases) to fp32: +4.4 GiB on the 7B, an autocast copy of lm_head each step and an fp32
# residual stream. Off: those stay bf16 as loaded (the LoRA weights and their optimizer stay
# fp32); `make bench` compares speed, memory and the loss curve of both (docs/BENCHMARKS.md).
FP32_CASTS = False


def attach_lora(model, config: Config, *, fp32_casts: bool | None = None,
                uncheckpointed_layers: int = 0, uncheckpointed_attention: int = 0):
    """The reference LoRA on q,k,v,o,gate,up,down with gradient checkpointing (but for the last
    `uncheckpointed_layers` decoder layers and `uncheckpointed_attention` attention blocks below
    them: `keep_layer_activations`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    fp32_casts = FP32_CASTS if fp32_casts is None else fp32_casts
    if uses_4bit(config) and fp32_casts:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=[t.strip() for t in config.lora_targets.split(",") if t.strip()],
        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA's A matrices are random: the same SEED, the same start
    model = get_peft_model(model, lora)
    keep_layer_activations(model, uncheckpointed_layers, uncheckpointed_attention)
    return model


def keep_layer_activations(model, layers: int, attention: int = 0) -> tuple[int, int]:
    """Gradient checkpointing on every decoder layer but the last `layers`, which keep their
    activations for the backward pass instead of recomputing their forward there; the
    `attention` layers below those keep their attention's activations and recompute only their
    MLP (a finer step: about a third of a layer's memory). This is the memory the planner finds
    left after the micro-batch, spent on less recomputation. Same gradients (checkpointing
    replays the dropout masks). Returns the layers and attention blocks actually kept."""
    from vqa.speed import inner_model

    decoder = inner_model(model).model.language_model.layers
    kept = min(layers, len(decoder))
    attention = min(attention, len(decoder) - kept)
    whole = len(decoder) - kept - attention  # layers checkpointed whole
    for index, layer in enumerate(decoder):
        layer.gradient_checkpointing = index < whole
        mlp_only = whole <= index < len(decoder) - kept
        if mlp_only and not hasattr(layer.mlp, "_vqa_checkpointed"):
            layer.mlp.forward = _checkpointed_forward(layer.mlp, layer.mlp.forward)
        if hasattr(layer.mlp, "_vqa_checkpointed"):
            layer.mlp._vqa_checkpointed = mlp_only
    return kept, attention


def _checkpointed_forward(module, original):
    """`module.forward`, checkpointed while training when `module._vqa_checkpointed` says so
    (non-reentrant, as `attach_lora` checkpoints whole layers)."""
    from torch.utils.checkpoint import checkpoint

    def forward(*args, **kwargs):
        if module._vqa_checkpointed and module.training and torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)
    module._vqa_checkpointed = False
    return forward


def adapter_in_compute_dtype(model) -> None:
    """The LoRA weights in the compute dtype (bf16 on a recent GPU), for prediction only.

    peft keeps an adapter in fp32 on a bf16 or 4-bit base, so at every adapted layer (7 per
    decoder layer, and the vision MLPs) it casts the bf16 input to fp32, runs two fp32 matmuls
    and casts back: a third of a 7B scoring batch's GPU time in the profile (bench.py,
    H200, 448x448, batch 64). Training keeps fp32, where the optimizer needs it.
    """
    _, dtype = device_and_dtype()
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)


def prepare_for_inference(model, processor, mode: str) -> None:
    """vqa/speed.py's prediction levers: the LoRA merged on the fly, MLPs in chunks of tokens,
    the vision tower in chunks of images, and for one-pass scoring an output layer of the four
    letters only."""
    from vqa.data import letter_token_ids
    from vqa.oom import free_memory

    fuse_inference_mlps(model)
    fuse_inference_linears(model)  # the LoRA layers the MLPs above do not cover
    chunk_vision_tower(model)
    if mode == "score":
        letters_only_head(model, letter_token_ids(processor.tokenizer))
        free_memory()  # the full lm_head's memory back to the card


def load_for_inference(config: Config, adapter_dir: Path | None, processor=None,
                       mode: str | None = None):
    """The base model with the trained adapter when one exists, ready for `mode` (default
    INFER_MODE) predictions when `processor` is given; says which model it is."""
    model = load_model(config, for_training=False)
    if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
        adapter_in_compute_dtype(model)
        source = f"base model + LoRA adapter from {adapter_dir}"
    else:
        source = "base model only (no adapter found: run `make train` first to fine-tune)"
    model.eval()
    if processor is not None:
        prepare_for_inference(model, processor, mode or config.infer_mode)
    return model, source
