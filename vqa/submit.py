"""`make submit`: every test row predicted exactly once into a validated submission.csv."""

from __future__ import annotations

import logging
import time

import torch

from vqa import distributed
from vqa.config import Config
from vqa.data import read_table
from vqa.io import file_fingerprint, write_json_atomic
from vqa.journal import PredictionJournal, journal_path, read_all, read_journals
from vqa.model import load_for_inference, load_processor
from vqa.options import answers_for, expanded, original_ids, rotated_for, write_probabilities
from vqa.predict import predict_rows
from vqa.planning.runplan import planned, stage_plan
from vqa.submission import submission_order, write_submission

log = logging.getLogger("vqa")


def run_signature(config: Config) -> dict:
    """What the journalled answers depend on: a change to any of it starts a fresh journal."""
    adapter = config.artifacts_dir / "lora_adapter"
    return {
        "model_id": config.resolved_model_id,
        "adapter": file_fingerprint(adapter / "adapter_model.safetensors"),
        "test_csv": file_fingerprint(config.data_dir / "test.csv"),
        "infer_mode": config.infer_mode,
        "tta": config.tta,
        "max_new_tokens": config.max_new_tokens,
        "quant": config.quant,
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
    }


def text_only_rows(test, text_only: dict[str, str]) -> list[dict]:
    """The rows answered without their image, with their CSV line, file and reason."""
    return [{"row": n + 2, "id": row["id"], "path": row["path"], "reason": text_only[row["id"]]}
            for n, row in enumerate(test.to_dict("records")) if row["id"] in text_only]


def submit(config: Config) -> dict:
    """Predicts the test rows not yet journalled and writes the validated submission.

    Under NPROC > 1 every rank answers its share of whole batches into its own journal; rank 0
    then merges all journals, validates and writes submission.csv.
    """
    here = distributed.init()
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    order = submission_order(test, config.data_dir)
    processor = load_processor(config)
    # Planned before the model is loaded, and from the card's total memory, as preflight did:
    # rank 0 makes it when it must, the others read what it saved.
    plan = stage_plan(config, "submit", processor) if here.is_main else None
    distributed.barrier()
    plan = plan or stage_plan(config, "submit", processor)
    config, processor = planned(config, plan, processor)
    batch = plan.pred_batch_size
    model, source = load_for_inference(config, config.artifacts_dir / "lora_adapter",
                                       processor)
    log.info("predicting %d test rows with %s, INFER_MODE=%s, %d rank(s)", len(test), source,
             config.infer_mode, here.size)
    signature = run_signature(config)
    main_journal = config.artifacts_dir / "predictions.journal.jsonl"
    journal = PredictionJournal(journal_path(main_journal, here.rank), signature)
    journal.load()  # each rank tidies its own journal (another run's is set aside)
    distributed.barrier()
    distributed.check_shared(config.artifacts_dir)
    done, _ = read_all(main_journal, signature)
    test_rows = test.to_dict("records")
    # TTA=rotate: every row under its 4 option shifts; CALIBRATE=prior: the prior's share too
    rotated = rotated_for(config, test_rows)
    asked = expanded(test_rows, rotated)
    rows = [r for r in asked if r["id"] not in done]
    if done:
        log.info("resuming: %d of %d %s already predicted (%s)", len(done), len(asked),
                 "rows asked (4 option shifts for each rotated row)" if rotated
                 else "test rows", main_journal)
    started = time.perf_counter()
    result = predict_rows(model, processor, rows, config.data_dir, batch_size=batch,
                          mode=config.infer_mode, max_new_tokens=config.max_new_tokens,
                          desc="submit", on_batch=journal.append, shard=(here.rank, here.size),
                          workers=config.loader_workers())
    distributed.barrier()
    predict_seconds = time.perf_counter() - started
    if not here.is_main:
        return {}
    asked_answers, asked_text_only, asked_probs = read_journals(main_journal, signature)
    answers, probs, prior = answers_for(config, test_rows, asked_answers, asked_probs, rotated)
    own = original_ids(test_rows, rotated)
    text_only = {own[i]: why for i, why in asked_text_only.items()}
    path = config.artifacts_dir / "submission.csv"
    frame = write_submission(path, answers, order)
    write_probabilities(config.artifacts_dir / "probabilities.csv", order, answers, probs)
    if config.infer_mode == "generate":
        log.info("INFER_MODE=generate: probabilities.csv holds the letters only (generation "
                 "gives no option probabilities)")
    report = {
        "model": source,
        "infer_mode": config.infer_mode,
        "tta": config.tta,
        "rows": len(frame),
        "rows_asked": len(asked),
        "calibrate": config.calibrate,
        "letter_prior": _prior_report(prior, rotated, len(test_rows)),
        "answer_counts": frame["answer"].value_counts().sort_index().to_dict(),
        "pred_batch_size": batch,
        "peak_reserved_gib_rank0": (round(torch.cuda.max_memory_reserved() / 2**30, 3)
                                    if torch.cuda.is_available() else None),
        "predicted_peak_reserved_gib": (plan.predict_peak or {}).get("reserved_gib"),
        "world_size": here.size,
        "resumed_rows": len(done),
        "predict_seconds": round(predict_seconds, 3),
        "seconds_per_row": round(predict_seconds / len(rows), 5) if rows else None,
        "out_of_memory_splits": result.oom_splits,
        "unparsed_generations_resolved_by_scoring": len(result.unparsed),
        "unparsed_ids": result.unparsed[:50],
        "text_only_rows": text_only_rows(test, text_only),
        "submission": str(path),
        "probabilities": str(config.artifacts_dir / "probabilities.csv"),
    }
    write_json_atomic(config.artifacts_dir / "submit_report.json", report)
    if text_only:
        first = next(iter(text_only.items()))
        log.warning("%d test row(s) had an unreadable image and were answered from the text "
                    "alone (listed in submit_report.json); first: id %s: %s",
                    len(text_only), *first)
    if result.unparsed:
        log.info("%d generated answer(s) held no option letter and were scored instead",
                 len(result.unparsed))
    if prior is not None:
        log.info("CALIBRATE=prior: letter prior %s estimated on %d rows asked under 4 shifts, "
                 "divided out of every row", _shares(prior), len(rotated))
    print(f"vqa submit: wrote {path} ({len(frame)} rows, every test id once, answers in a-d) "
          f"and probabilities.csv" + (" (TTA=rotate: 4 option shifts averaged)"
                                      if config.tta == "rotate" else "")
          + (" (CALIBRATE=prior: letter prior divided out)" if prior is not None else ""))
    return report


def _shares(prior: list[float]) -> str:
    return " ".join(f"{x}={p:.3f}" for x, p in zip("abcd", prior))


def _prior_report(prior: list[float] | None, rotated: frozenset[str], rows: int) -> dict | None:
    """The estimated letter prior and the rows it came from (None without CALIBRATE=prior)."""
    if prior is None:
        return None
    return {"prior": dict(zip("abcd", (round(p, 4) for p in prior))),
            "estimated_on_rows": len(rotated), "share": round(len(rotated) / max(1, rows), 4)}
