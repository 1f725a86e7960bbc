"""`make model`: build the embedded tiny Qwen2.5-VL and pretrain it like a real base model.

A real Qwen2.5-VL arrives with a vision tower aligned to its word embeddings and a language model
that already answers multiple-choice prompts; LoRA then adapts it. A random-init tiny model has
neither, and LoRA on a frozen random base does not learn from images at all. So this stage gives
the tiny base two short pretraining stages on easy-vqa questions whose images the demo never uses
(even image ids; the demo's train.csv uses odd ones and its test.csv easy-vqa's test images):

1. Vision alignment (CLIP-style): the vision tower's pooled output is trained to pick the image's
   colour word and shape word among the language model's own input embeddings. A random vision
   tower loses most colour information (a linear probe on its features: ~50% on 8 colours).
2. Language pretraining, all parameters: the multiple-choice prompt of the fine-tune and predict
   stages, mixed with open-ended answers ("what color is the shape?" -> "red"). Batches draw the
   three question families equally often: in easy-vqa's natural mix (74% yes/no, whose wording
   alone gives the answer 82% of the time) the model settles on text priors.

docs/EMBEDDED_DEFAULT.md records what was measured and what did not work.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vqa import tiny
from vqa.config import Config
from vqa.data import VQACollator, load_image, prompt_text
from vqa.easyvqa import COLORS, SHAPES, pretraining_questions, to_rows
from vqa.io import write_json_atomic
from vqa.predict import accuracy, accuracy_by, predict_rows

log = logging.getLogger("vqa")

# Korean text also occurs in real data: the tokenizer sees some so it is not all byte fallback.
KOREAN_SAMPLES = [
    "이미지에 있는 도형의 색깔은 무엇입니까?", "사진 속 물체는 어떤 모양입니까?",
    "다음 중 올바른 답을 고르시오.", "빨간색", "초록색", "파란색", "원", "삼각형", "사각형", "예", "아니오",
]

VISION_BATCH = 32
VISION_LR = 2e-3
ANCHOR_WEIGHT = 1.0
LM_BATCH = 8
LM_LR = 1e-3
OPEN_ENDED_SHARE = 0.3
CHECK_ROWS_PER_FAMILY = 100


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


def image_labels(questions) -> dict[int, tuple[int, int]]:
    """(colour index, shape index) of every image whose questions reveal both."""
    color, shape = {}, {}
    for q in questions:
        if q.answer in COLORS:
            color[q.image_id] = COLORS.index(q.answer)
        elif q.answer in SHAPES:
            shape[q.image_id] = SHAPES.index(q.answer)
    return {i: (color[i], shape[i]) for i in sorted(set(color) & set(shape))}


def linear_patch_embedding(model) -> None:
    """The vision tower's patch embedding as the matrix product it is (kernel = stride = the
    whole patch), for pretraining on CPU: PyTorch's CPU Conv3d and its backward took 28% of an
    alignment step (0.157 s -> 0.113 s a step on 2 cores, same output). The weights keep their
    Conv3d shape, so the saved model is unchanged."""
    embed = model.model.visual.patch_embed
    conv = embed.proj

    def forward(pixels):
        weight = conv.weight.reshape(conv.weight.shape[0], -1)
        return F.linear(pixels.reshape(-1, weight.shape[1]).to(weight.dtype), weight, conv.bias)

    embed.forward = forward


def align_vision(model, processor, images: dict, labels: dict, steps: int, rng: random.Random):
    """Stage 1: pooled visual features pick the colour and shape words among the word embeddings.

    Every image is processed once up front: the processor per batch cost a sixth of a step.
    """
    tokenizer = processor.tokenizer
    words = COLORS + SHAPES
    word_ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    if any(len(ids) != 1 for ids in word_ids):
        raise RuntimeError("the tiny tokenizer must keep every easy-vqa answer a single token")
    word_ids = torch.tensor([ids[0] for ids in word_ids])
    embeddings = model.model.language_model.embed_tokens.weight
    visual = model.model.visual
    optimizer = torch.optim.AdamW([*visual.parameters(), embeddings], lr=VISION_LR)
    image_ids = list(labels)
    processed = processor.image_processor(images=[images[i] for i in image_ids],
                                          return_tensors="pt")
    grid = processed["image_grid_thw"]
    if len(set(map(tuple, grid.tolist()))) != 1:
        raise RuntimeError("align_vision expects images of one size (easy-vqa's 64x64)")
    pixels = processed["pixel_values"].unflatten(0, (len(image_ids), -1))  # (images, patches, .)
    position = {image_id: n for n, image_id in enumerate(image_ids)}
    hits = []
    for _ in tqdm(range(steps), desc="align vision tower", unit="step", leave=False):
        chunk = rng.sample(image_ids, VISION_BATCH)
        rows = torch.tensor([position[i] for i in chunk])
        features = visual(pixels[rows].flatten(0, 1),
                          grid_thw=grid[:1].expand(len(chunk), -1)).pooler_output
        pooled = features.reshape(len(chunk), -1, features.shape[-1]).mean(1)
        logits = 10 * F.normalize(pooled, dim=-1) @ F.normalize(embeddings[word_ids], dim=-1).T
        color = torch.tensor([labels[i][0] for i in chunk])
        shape = torch.tensor([labels[i][1] for i in chunk])
        target = (embeddings[word_ids[color]] + embeddings[word_ids[len(COLORS) + shape]]).detach()
        loss = (F.cross_entropy(logits[:, :len(COLORS)], color)
                + F.cross_entropy(logits[:, len(COLORS):], shape)
                + ANCHOR_WEIGHT * F.mse_loss(pooled, target, reduction="sum") / len(chunk))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits.append(((logits[:, :len(COLORS)].argmax(-1) == color).float().mean().item(),
                     (logits[:, len(COLORS):].argmax(-1) == shape).float().mean().item()))
    recent = hits[-20:]
    return {"colour_accuracy_last_20_steps": sum(h[0] for h in recent) / len(recent),
            "shape_accuracy_last_20_steps": sum(h[1] for h in recent) / len(recent)}


def pretrain_language(model, processor, pools: dict[str, list[dict]], steps: int,
                      rng: random.Random) -> list[float]:
    """Stage 2: all parameters on multiple-choice and open-ended batches, families balanced."""
    collate = VQACollator(processor, Path("."), train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    families = sorted(pools)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="pretrain tiny base", unit="step"):
        chunk = [rng.choice(pools[rng.choice(families)]) for _ in range(LM_BATCH)]
        open_ended = rng.random() < OPEN_ENDED_SHARE
        batch = open_ended_batch(processor, chunk) if open_ended else collate(chunk)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return losses


def multiple_choice_accuracy(model, processor, rows: list[dict], blank: bool = False) -> dict:
    """Held-out accuracy per family with the predict stage's own scoring."""
    model.eval()
    answers = predict_rows(model, processor, rows, Path("."), batch_size=64,
                           blank_images=blank, desc="check base").answers
    model.train()
    out = {family: round(v["accuracy"], 3)
           for family, v in accuracy_by(rows, answers, "family").items()}
    out["all"] = round(accuracy(rows, answers), 3)
    return out


def build_embedded_model(config: Config) -> Path:
    started = time.time()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    questions = pretraining_questions()
    paths = {q.image_id: q.image_path for q in questions}
    images = {i: load_image(p) for i, p in tqdm(paths.items(), desc="load base images",
                                                unit="image", leave=False)}
    rows = to_rows(questions, "base", config.seed).to_dict("records")
    for row in rows:
        row["image"] = images[int(Path(row["path"]).stem)]

    tokenizer = tiny.train_tokenizer([prompt_text(r) for r in rows] + KOREAN_SAMPLES)
    processor = tiny.tiny_processor(tokenizer)
    model = tiny.init_tiny_model(tiny.tiny_config(tokenizer), config.seed)

    # Held-out check rows per family never enter a training batch.
    by_family: dict[str, list[dict]] = {}
    for row in rows:
        by_family.setdefault(row["family"], []).append(row)
    check = [r for members in by_family.values() for r in members[-CHECK_ROWS_PER_FAMILY:]]
    pools = {f: members[:-CHECK_ROWS_PER_FAMILY] for f, members in by_family.items()}

    linear_patch_embedding(model)
    steps = config.base_pretrain_steps
    vision_steps = min(1000, max(10, steps // 2))
    vision = align_vision(model, processor, images, image_labels(questions), vision_steps, rng)
    log.info("vision alignment (%d steps): %s", vision_steps, vision)
    losses = pretrain_language(model, processor, pools, steps, rng)
    accuracy = multiple_choice_accuracy(model, processor, check)
    blank = multiple_choice_accuracy(model, processor, check, blank=True)
    log.info("tiny base after %d steps: held-out multiple-choice accuracy %s; blank images %s",
             steps, accuracy, blank)
    meta = {
        "what": "embedded tiny Qwen2.5-VL, pretrained on easy-vqa train images with even ids",
        "seed": config.seed, "vision_steps": vision_steps, "language_steps": steps,
        "batch": LM_BATCH, "lr": LM_LR, "open_ended_share": OPEN_ENDED_SHARE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_alignment": vision,
        "held_out_accuracy": accuracy, "held_out_blank_image_accuracy": blank,
        "seconds": round(time.time() - started, 1),
    }
    folder = config.model_dir
    tiny.save_model_folder(model, processor, folder, meta)
    write_json_atomic(config.artifacts_dir / "base_model_report.json",
                      {**meta, "loss_every_step": losses})
    log.info("saved %s (%.0f s)", folder, time.time() - started)
    return folder
