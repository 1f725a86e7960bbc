"""Real-size Qwen VL models (every family in vqa/families/) with random weights, and synthetic
data, for GPU benchmarks.

Memory and speed depend on the architecture, not on the weight values, so a benchmark builds a
model from the published shapes (architectures.json, from the checkpoints' config.json) with
random weights, saves it with `save_pretrained`, and then runs the product's own
`from_pretrained` path (4-bit included) on it. The tokenizer is the embedded default's (trained
locally); its token ids sit inside the real vocabulary, whose full size the model keeps.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from vqa import tiny
from vqa.config import BenchConfig
from vqa.families import family_for
from vqa.planning.shapes import published_architectures


# A Korean question of typical length, and options like a competition's.
KOREAN_QUESTION = "이 사진에서 가장 눈에 띄는 물체의 색깔과 모양을 고려할 때, 다음 중 올바른 설명은 무엇입니까?"
OPTIONS = ["빨간색 원", "파란색 삼각형", "초록색 사각형", "노란색 별"]


def real_size_config(model_name: str, tokenizer):
    """The config of `model_name` (any family in architectures.json) with its published shapes
    and the local tokenizer's special-token ids."""
    from transformers import AutoConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIAL_TOKENS}
    config = json.loads(json.dumps(published_architectures()["models"][model_name]["config"]))
    text = config.get("text_config", config)  # Qwen2-VL's hub config is flat
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    config.pop("vision_token_id", None)
    return AutoConfig.for_model(**config)


def bench_model_id(name: str) -> str:
    """A BENCH_MODELS entry as a hub id: 7B is Qwen2.5-VL-7B, Qwen3-VL-8B is Qwen3-VL-8B's
    Instruct checkpoint, Qwen3.5-4B is Qwen/Qwen3.5-4B, a full id stays as it is
    (architectures.json must hold it)."""
    if "/" in name:
        return name
    if not name.startswith("Qwen"):
        return f"Qwen/Qwen2.5-VL-{name}-Instruct"
    # Qwen3.5's checkpoints have no -Instruct suffix
    return f"Qwen/{name}" if f"Qwen/{name}" in published_architectures()["models"] \
        else f"Qwen/{name}-Instruct"


def build_random_model(model_name: str, folder: Path, seed: int = 0) -> Path:
    """Random-init `model_name` in bf16 on the GPU, saved with its processor into `folder`; a
    folder that already holds this build (the same name and seed) is kept as it is."""
    stamp = Path(folder) / "vqa_random_model.json"
    built = {"model": model_name, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == built:
        return Path(folder)
    from transformers import GenerationConfig

    corpus = [f"{KOREAN_QUESTION}\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCD", OPTIONS))]
    tokenizer = tiny.train_tokenizer(corpus * 20 + ["what is the color of the shape?"] * 20)
    entry = published_architectures()["models"][model_name]
    family = family_for(entry["config"]["model_type"], model_name)
    preprocessor = entry["preprocessor"]
    processor = family.processor(tokenizer, preprocessor["min_pixels"],
                                 preprocessor["max_pixels"], tiny.QWEN_VL_CHAT_TEMPLATE)
    config = real_size_config(model_name, tokenizer)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tiny.model_class(config)._from_config(config, dtype=torch.bfloat16)
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, do_sample=False)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    stamp.write_text(json.dumps(built))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def write_synthetic_data(folder: Path, train_rows: int, test_rows: int,
                         size: tuple[int, int] | list[tuple[int, int]] = (448, 448),
                         seed: int = 0, images: int | None = None) -> Path:
    """train.csv/test.csv in the contract over random-noise images of `size` (width, height;
    a list of sizes: image n has the (n mod len)th, a mixed set); `images`: at most this many
    distinct image files, shared by the rows in turn (memory and speed depend on the images'
    size, not on their pixels)."""
    sizes = size if isinstance(size, list) else [size]
    rng = random.Random(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(train_rows + test_rows):
        index = n % images if images else n
        path = f"images/{index}.png"
        if index == n:
            width, height = sizes[index % len(sizes)]
            pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed + n)).numpy()
            Image.fromarray(pixels).save(folder / path)
        options = rng.sample(OPTIONS, 4)
        rows.append({"id": f"r{n:05d}", "path": path, "question": KOREAN_QUESTION,
                     "a": options[0], "b": options[1], "c": options[2], "d": options[3],
                     "answer": "abcd"[n % 4]})
    frame = pd.DataFrame(rows)
    frame.iloc[:train_rows].to_csv(folder / "train.csv", index=False)
    frame.iloc[train_rows:].drop(columns=["answer"]).to_csv(folder / "test.csv", index=False)
    return folder


@dataclass
class BenchRun:
    """What a GPU benchmark script starts from: its flags and settings, the device, where to
    write."""

    args: argparse.Namespace
    settings: BenchConfig  # BENCH_* (vqa/config.py), from the environment or KEY=value
    cuda: bool
    out: Path  # ARTIFACTS_DIR/<name>
    scratch: Path  # BENCH_SCRATCH: models and synthetic data
    cap_bytes: int | None  # BENCH_CAP (make bench CAP=24GiB), parsed


# What the model's forward takes of a collated training batch (the collator adds row ids).
MODEL_INPUTS = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                "mm_token_type_ids", "labels"}


def bench_run(name: str, description: str, scratch: str, dry_run_help: str,
              parser: argparse.ArgumentParser | None = None) -> BenchRun | None:
    """The shared command line of `make bench` and `make bench-memory`: --dry-run and
    --model-dir (on top of `parser`'s own flags), then settings as KEY=value (BENCH_* and the
    run's own, e.g. ARTIFACTS_DIR), as every stage takes them. Returns None after saying so on
    a machine without CUDA (unless --dry-run); --dry-run without --model-dir and a bad setting
    exit with one line."""
    import sys

    from vqa.config import ConfigError, load_bench_config, load_config
    from vqa.planning.hardware import parse_memory

    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--model-dir", help="a local model instead of building real sizes")
    args, settings = parser.parse_known_args()
    try:
        config = load_config(settings, bench=True)
        bench = load_bench_config(settings)
    except ConfigError as exc:
        sys.exit(f"{name}: error: {exc}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(f"{name}: no CUDA GPU here; this benchmark runs on a GPU machine only")
        return None
    if args.dry_run and not args.model_dir:
        sys.exit(f"{name}: --dry-run needs --model-dir")
    out = config.artifacts_dir / name
    out.mkdir(parents=True, exist_ok=True)
    return BenchRun(args, bench, cuda, out, bench.bench_scratch or Path(scratch),
                    parse_memory(bench.bench_cap) if bench.bench_cap else None)
