"""The prediction journal: what `make submit` has already answered, safe against a kill.

One JSON line per answered row, appended after every batch, flushed and fsynced. The first line
is a header with the run's signature (model, adapter, test.csv, inference settings): a journal
from another signature is set aside, never mixed in. A line torn by a kill mid-write is cut off
when the journal is reopened, so a rerun resumes from the last whole line.

With several ranks (NPROC > 1) rank r > 0 writes `<name>.rank<r>.jsonl` beside the main file;
`read_all` merges every journal of the same signature, whatever NPROC wrote them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("vqa")


def _read(path: Path, signature: dict
          ) -> tuple[dict[str, str], dict[str, str], int, dict[str, list[float]]] | None:
    """(answers, text-only notes, bytes of whole lines, letter probabilities) of a journal of
    `signature`; None when the file is missing or belongs to another signature. A line torn by
    a kill is left out."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    lines = whole.decode("utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        return None
    if header.get("signature") != signature:
        return None
    answers: dict[str, str] = {}
    text_only: dict[str, str] = {}
    probs: dict[str, list[float]] = {}
    for line in lines[1:]:
        entry = json.loads(line)
        answers[entry["id"]] = entry["answer"]
        if "text_only" in entry:
            text_only[entry["id"]] = entry["text_only"]
        if "p" in entry:
            probs[entry["id"]] = entry["p"]
    return answers, text_only, len(whole), probs


class PredictionJournal:
    def __init__(self, path: Path, signature: dict):
        self.path = Path(path)
        self.signature = signature

    def load(self) -> dict[str, str]:
        """Answers already journalled for this signature; a journal of another run is set aside
        and a new one started; a line torn by a kill is cut off the file."""
        found = _read(self.path, self.signature)
        if found is None:
            if self.path.is_file():
                stale = self.path.with_suffix(self.path.suffix + ".stale")
                os.replace(self.path, stale)
                log.info("prediction journal %s belongs to another run: moved to %s", self.path,
                         stale)
            self._start()
            return {}
        answers, _, whole, _ = found
        if whole != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(whole)
                os.fsync(handle.fileno())
        return answers

    def append(self, answers: dict[str, str], text_only: dict[str, str] | None = None,
               probs: dict[str, list[float]] | None = None) -> None:
        """Journals one batch; `text_only` notes the rows answered without their image,
        `probs` the letter probabilities (score mode)."""
        if not answers:
            return
        text_only, probs = text_only or {}, probs or {}
        entries = [{"id": i, "answer": a, **({"text_only": text_only[i]} if i in text_only else {}),
                    **({"p": probs[i]} if i in probs else {})} for i, a in answers.items()]
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"signature": self.signature}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def journal_path(main: Path, rank: int) -> Path:
    main = Path(main)
    return main if rank == 0 else main.with_name(f"{main.stem}.rank{rank}{main.suffix}")


def rank_journals(main: Path) -> list[Path]:
    main = Path(main)
    return sorted(main.parent.glob(f"{main.stem}.rank*{main.suffix}"))


def read_journals(main: Path, signature: dict
                  ) -> tuple[dict[str, str], dict[str, str], dict[str, list[float]]]:
    """(answers, text-only notes, letter probabilities) from the main journal and every
    rank's, read only; journals of another signature and a line torn by a kill are ignored."""
    answers: dict[str, str] = {}
    text_only: dict[str, str] = {}
    probs: dict[str, list[float]] = {}
    for path in [Path(main), *rank_journals(main)]:
        found = _read(path, signature)
        if found is not None:
            answers.update(found[0])
            text_only.update(found[1])
            probs.update(found[3])
    return answers, text_only, probs


def read_all(main: Path, signature: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(answers, text-only notes): `read_journals` without the probabilities."""
    answers, text_only, _ = read_journals(main, signature)
    return answers, text_only
