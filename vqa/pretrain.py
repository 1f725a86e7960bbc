"""`make model`: build the embedded tiny Qwen2.5-VL and pretrain it like a real base model.

A real Qwen2.5-VL arrives already able to name colours and shapes and to answer multiple-choice
prompts; LoRA then adapts it. A random-init tiny model can do neither, and LoRA on a frozen random
base does not learn from images at all. So this stage gives the tiny base a short, full-parameter
pretraining on easy-vqa questions whose images the demo never uses (even image ids; the demo's
train.csv uses odd ones and its test.csv easy-vqa's test images), mixing two tasks:
- open-ended answers ("what color is the shape?" -> "red"), which ground the vision tower, and
- the multiple-choice prompt that the fine-tune and predict stages use, options shuffled.
Batches draw the three question families equally often: left to easy-vqa's natural mix (74%
yes/no, whose wording alone gives the answer 82% of the time) the model settles on text priors
and never looks at the picture. docs/EMBEDDED_DEFAULT.md tells the whole story.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vqa import tiny
from vqa.config import Config
from vqa.data import LETTERS, VQACollator, letter_token_ids, load_image, prompt_text
from vqa.easyvqa import pretraining_questions, to_rows
from vqa.io import write_json_atomic

log = logging.getLogger("vqa")

# Korean text also occurs in real data: the tokenizer sees some so it is not all byte fallback.
KOREAN_SAMPLES = [
    "이미지에 있는 도형의 색깔은 무엇입니까?", "사진 속 물체는 어떤 모양입니까?",
    "다음 중 올바른 답을 고르시오.", "빨간색", "초록색", "파란색", "원", "삼각형", "사각형", "예", "아니오",
]

PRETRAIN_BATCH = 8
PRETRAIN_LR = 1e-3
OPEN_ENDED_SHARE = 0.5


def open_ended_batch(processor, rows: list[dict]) -> dict:
    """Image + bare question -> the answer word; labels on the answer's tokens and <|im_end|>."""
    tokenizer = processor.tokenizer
    texts, label_lengths = [], []
    for row in rows:
        answer = row[row["answer"]]
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": row["question"]}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(prompt + answer + "<|im_end|>")
        label_lengths.append(len(tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)))
    batch = processor(text=texts, images=[row["image"] for row in rows], padding=True,
                      padding_side="left", return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, n in enumerate(label_lengths):
        labels[i, -n:] = batch["input_ids"][i, -n:]
    batch["labels"] = labels
    batch.pop("token_type_ids", None)
    return dict(batch)


@torch.inference_mode()
def multiple_choice_accuracy(model, processor, rows: list[dict], blank: bool = False) -> dict:
    collate = VQACollator(processor, Path("."), train=False, blank_images=blank)
    letter_ids = letter_token_ids(processor.tokenizer)
    hits: dict[str, list[bool]] = {}
    model.eval()
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        logits = model(**collate(chunk), logits_to_keep=1).logits[:, -1, letter_ids]
        for row, choice in zip(chunk, logits.argmax(-1).tolist()):
            hits.setdefault(row["family"], []).append(LETTERS[choice] == row["answer"])
    model.train()
    out = {family: sum(v) / len(v) for family, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def build_embedded_model(config: Config) -> Path:
    started = time.time()
    steps = config.base_pretrain_steps
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    questions = pretraining_questions()
    rows = to_rows(questions, "base", config.seed).to_dict("records")
    images = {q.image_id: q.image_path for q in questions}
    cache: dict[int, object] = {}
    for row in tqdm(rows, desc="load base images", unit="row", leave=False):
        image_id = int(Path(row["path"]).stem)
        if image_id not in cache:
            cache[image_id] = load_image(images[image_id])
        row["image"] = cache[image_id]

    tokenizer = tiny.train_tokenizer([prompt_text(r) for r in rows] + KOREAN_SAMPLES)
    processor = tiny.tiny_processor(tokenizer)
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer), config.seed)
    model.train()

    # Held-out check rows: the last 300 per family never enter a training batch.
    by_family: dict[str, list[dict]] = {}
    for row in rows:
        by_family.setdefault(row["family"], []).append(row)
    check = [r for members in by_family.values() for r in members[-100:]]
    pools = {family: members[:-100] for family, members in sorted(by_family.items())}
    families = sorted(pools)

    collate = VQACollator(processor, Path("."), train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    losses = []
    for step in tqdm(range(steps), desc="pretrain tiny base", unit="step"):
        chunk = [rng.choice(pools[rng.choice(families)]) for _ in range(PRETRAIN_BATCH)]
        open_ended = rng.random() < OPEN_ENDED_SHARE
        batch = open_ended_batch(processor, chunk) if open_ended else collate(chunk)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))

    accuracy = multiple_choice_accuracy(model, processor, check)
    blank = multiple_choice_accuracy(model, processor, check, blank=True)
    log.info("tiny base after %d steps: held-out multiple-choice accuracy %s (blank images %s)",
             steps, _fmt(accuracy), _fmt(blank))
    meta = {
        "what": "embedded tiny Qwen2.5-VL, pretrained on easy-vqa even image ids",
        "seed": config.seed, "steps": steps, "batch": PRETRAIN_BATCH,
        "lr": PRETRAIN_LR, "open_ended_share": OPEN_ENDED_SHARE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_accuracy": accuracy, "held_out_blank_image_accuracy": blank,
        "seconds": round(time.time() - started, 1),
    }
    folder = config.model_dir
    tiny.save_model_folder(model, processor, folder, meta)
    write_json_atomic(config.artifacts_dir / "base_model_report.json",
                      {**meta, "loss_every_step": losses})
    log.info("saved %s (%.0f s)", folder, time.time() - started)
    return folder


def _fmt(acc: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
