"""`make submit`: every test row predicted exactly once into a validated submission.csv."""

from __future__ import annotations

import logging

from vqa.config import Config
from vqa.data import read_table
from vqa.io import write_json_atomic
from vqa.memory import plan_batch_sizes
from vqa.model import load_for_inference, load_processor
from vqa.predict import predict_rows
from vqa.submission import submission_order, write_submission

log = logging.getLogger("vqa")


def submit(config: Config) -> dict:
    test = read_table(config.data_dir / "test.csv", with_answer=False)
    order = submission_order(test, config.data_dir)
    processor = load_processor(config)
    model, source = load_for_inference(config, config.artifacts_dir / "lora_adapter")
    log.info("predicting %d test rows with %s, INFER_MODE=%s", len(test), source,
             config.infer_mode)
    batch = plan_batch_sizes(config).pred_batch_size
    result = predict_rows(model, processor, test.to_dict("records"), config.data_dir,
                          batch_size=batch, mode=config.infer_mode,
                          max_new_tokens=config.max_new_tokens, desc="submit")
    path = config.artifacts_dir / "submission.csv"
    frame = write_submission(path, result.answers, order)
    report = {
        "model": source,
        "infer_mode": config.infer_mode,
        "rows": len(frame),
        "answer_counts": frame["answer"].value_counts().sort_index().to_dict(),
        "pred_batch_size": batch,
        "unparsed_generations_resolved_by_scoring": len(result.unparsed),
        "unparsed_ids": result.unparsed[:50],
        "submission": str(path),
    }
    write_json_atomic(config.artifacts_dir / "submit_report.json", report)
    if result.unparsed:
        log.info("%d generated answer(s) held no option letter and were scored instead",
                 len(result.unparsed))
    print(f"vqa submit: wrote {path} ({len(frame)} rows, every test id once, answers in a-d)")
    return report
