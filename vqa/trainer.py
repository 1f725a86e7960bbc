"""The training step `make train` runs, and what watches it: the HF Trainer subclass with the
out-of-memory back-off and the loss at the labelled positions, the validation metrics, the step
timer, TensorBoard and the curves of loss, accuracy and memory. `make bench` and `make
bench-memory` time this same step through `vqa.train.build_trainer`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from vqa.data import LETTERS
from vqa.speed import label_window

log = logging.getLogger("vqa")


def letter_metrics(letter_ids: list[int]):
    """Trainer hooks that reduce each eval batch to the four letter logits, then score them."""
    letter_index = {token: i for i, token in enumerate(letter_ids)}

    def preprocess_logits_for_metrics(logits, labels):
        # Left-padded rows end with <letter><|im_end|>: the logits at -3 predict the letter.
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits[:, -3, letter_ids]

    def compute_metrics(prediction):
        predicted = np.asarray(prediction.predictions).argmax(-1)
        # Batches are concatenated with -100 padding on the right: the letter is the first label.
        labels = np.asarray(prediction.label_ids)
        first = (labels != -100).argmax(axis=1)
        truth = np.array([letter_index[int(t)] for t in labels[np.arange(len(labels)), first]])
        metrics = {"accuracy": float((predicted == truth).mean())}
        for i, letter in enumerate(LETTERS):
            mask = truth == i
            if mask.any():
                metrics[f"accuracy_{letter}"] = float((predicted[mask] == i).mean())
        return metrics

    return preprocess_logits_for_metrics, compute_metrics


class TrainingOutOfMemory(RuntimeError):
    """One row alone does not fit in a training step: the message names it and the remedy."""


def backoff_trainer_class():
    """The HF Trainer with a training step that survives CUDA out-of-memory.

    On OutOfMemoryError the micro-batch is split in two and its pieces accumulate into the same
    optimizer step, so the optimizer sees the same rows and the same effective batch. Because a
    backward that failed halfway may have added part of its gradients, the accumulation window's
    earlier micro-batches (kept as CPU copies until the optimizer steps) are replayed after zeroing
    the gradients. Later micro-batches at least as long as the one that failed are split up front.
    A single row that does not fit raises TrainingOutOfMemory; checkpoints already saved stay.
    """
    from transformers import Trainer

    from vqa.oom import FaultInjector, even_sizes, free_memory, split_batch

    class BackoffTrainer(Trainer):
        def __init__(self, *args, remedy: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.remedy = remedy
            self.faults = FaultInjector()
            self._piece_ids: list = []
            self._piece_weight = 1.0  # a piece's share of its micro-batch's mean loss
            self.split_from_length: int | None = None  # micro-batches this long or longer ...
            self.piece_rows: int | None = None  # ... run in pieces of at most this many rows
            self.oom_events: list[dict] = []
            self._window: list[tuple[dict, object]] = []  # micro-batches since the optimizer step
            self._window_step = -1
            self._tokens = 0  # tokens trained on since the last log line, and when it was
            self._tokens_since = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = {k: v for k, v in inputs.items() if k != "row_ids"}
            # Logits only where the labels are; labelled_loss (compute_loss_func) takes them.
            inputs["logits_to_keep"] = label_window(inputs["labels"])
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if self._piece_weight == 1.0:
                return result
            if isinstance(result, tuple):
                return (result[0] * self._piece_weight, *result[1:])
            return result * self._piece_weight

        def log(self, logs: dict, *args, **kwargs) -> None:
            """Each training log line gains tokens/s since the last one and the memory held
            (the GPU's reserved memory, or the process's resident memory on CPU), so the
            TensorBoard events and train_curve.png show them."""
            if "loss" in logs:
                now = time.perf_counter()
                if self._tokens_since is not None and now > self._tokens_since:
                    logs["tokens_per_second"] = round(float(self._tokens)
                                                      / (now - self._tokens_since), 1)
                self._tokens, self._tokens_since = 0, now
                logs.update(memory_now())
            super().log(logs, *args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._tokens_since is None:
                self._tokens_since = time.perf_counter()
            if self.state.global_step != self._window_step:
                self._window, self._window_step = [], self.state.global_step
            failure = None
            try:
                loss = self._run_pieces(model, inputs, num_items_in_batch)
            except torch.cuda.OutOfMemoryError as error:
                # Recover outside the except block and without the traceback: its frames hold
                # the failed forward's activations, which free_memory() could not release.
                failure = error.with_traceback(None)
            if failure is not None:
                loss = self._recover(model, inputs, num_items_in_batch, failure)
            if len(self._window) + 1 < self.args.gradient_accumulation_steps:
                # A later micro-batch of this window may need it replayed. The window's last
                # one never is (the optimizer steps after it), so with no accumulation nothing
                # is copied back from the GPU (a 1024x768 batch of 16 holds 300 MB of pixels,
                # and .cpu() waits for the step to finish before it can copy them).
                self._window.append(({k: v.cpu() if torch.is_tensor(v) else v
                                      for k, v in inputs.items()}, num_items_in_batch))
            mask = inputs.get("attention_mask")  # summed on the GPU: read at the next log line
            self._tokens = self._tokens + (mask.sum() if mask is not None
                                           else inputs["input_ids"].numel())
            return loss

        def _sizes(self, inputs) -> list[int]:
            rows, length = inputs["input_ids"].shape
            if self.piece_rows and length >= self.split_from_length and rows > self.piece_rows:
                return even_sizes(rows, self.piece_rows)
            return [rows]

        def _run_pieces(self, model, inputs, num_items_in_batch, replay: bool = False):
            """Runs a micro-batch as pieces whose gradients add up to the micro-batch's own.

            Under DDP only the last piece of the micro-batch that ends an accumulation window
            synchronises gradients (once, as without pieces); replays never do.
            """
            import contextlib

            sizes = self._sizes(inputs)
            # Trainer divides the summed loss by num_items_in_batch when the model or our
            # compute_loss_func takes it; otherwise each piece's mean is weighted by its share
            # of the labels.
            summed = num_items_in_batch is not None and (
                self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            labelled = (inputs["labels"][:, 1:] != -100).sum(1)
            total, start = 0.0, 0
            try:
                for n, piece in enumerate(split_batch(inputs, sizes)):
                    rows = piece["input_ids"].shape[0]
                    quiet = hasattr(model, "no_sync") and (replay or n < len(sizes) - 1)
                    if len(sizes) > 1 and not summed:
                        share = labelled[start:start + rows].sum() / labelled.sum()
                        self._piece_weight = float(share)
                    self._piece_ids = piece.get("row_ids", [])
                    self.faults.before_forward(rows)
                    with model.no_sync() if quiet else contextlib.nullcontext():
                        total = total + super().training_step(model, piece, num_items_in_batch)
                    start += rows
            finally:
                self._piece_weight = 1.0
            return total

        def _recover(self, model, inputs, num_items_in_batch, error):
            rows, length = inputs["input_ids"].shape
            while True:
                failed = max(self._sizes(inputs)) if self.piece_rows else rows
                free_memory()
                if failed == 1:
                    ids = ", ".join(map(str, self._piece_ids)) or "?"
                    raise TrainingOutOfMemory(
                        f"training row id {ids} does not fit in GPU memory even alone (batch "
                        f"of {rows} rows, {length} tokens): {self.remedy}; the last checkpoint "
                        f"in {self.args.output_dir} is kept and `make train` resumes from it"
                    ) from error
                self.piece_rows = max(1, failed // 2)
                self.split_from_length = min(length, self.split_from_length or length)
                event = {"optimizer_step": self.state.global_step, "rows": rows,
                         "sequence_length": length, "now_rows_per_piece": self.piece_rows,
                         "error": str(error).splitlines()[0][:200]}
                self.oom_events.append(event)
                log.warning("out of GPU memory in a training step (%d rows, %d tokens): "
                            "splitting into pieces of %d rows, same effective batch",
                            rows, length, self.piece_rows)
                # A backward that failed halfway may have added part of its gradients.
                model.zero_grad(set_to_none=True)
                try:
                    for earlier, items in self._window:
                        self._run_pieces(model, self._prepare_inputs(earlier), items, replay=True)
                    return self._run_pieces(model, inputs, num_items_in_batch)
                except torch.cuda.OutOfMemoryError as again:
                    error = again.with_traceback(None)  # (see training_step)

    return BackoffTrainer


def memory_now() -> dict:
    """The memory a training log line records: the GPU's reserved and peak reserved GiB on
    CUDA, the process's resident GiB on CPU."""
    if torch.cuda.is_available():
        return {"gpu_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 3),
                "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    import psutil

    return {"cpu_rss_gib": round(psutil.Process().memory_info().rss / 2**30, 3)}


def tensorboard_callback(log_dir):
    """The HF Trainer's TensorBoard callback writing to `log_dir` (ARTIFACTS_DIR/runs/<run>):
    every number of every log line (loss, learning rate, grad norm, validation accuracy,
    tokens/s, memory) as a scalar over optimizer steps."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def step_timer():
    """A Trainer callback that times every optimizer step (steady-state throughput)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._last = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

        def on_evaluate(self, args, state, control, **kwargs):
            self._last = None  # evaluation and checkpoints are not training steps

        def on_save(self, args, state, control, **kwargs):
            self._last = None

    return StepTimer()


def step_seconds(trainer) -> list[float]:
    """Seconds per optimizer step, as the trainer's StepTimer (`step_timer`) measured them."""
    return next(c.seconds for c in trainer.callback_handler.callbacks
                if type(c).__name__ == "StepTimer")


def plot_curves(history: list[dict], path: Path, predicted_peak_gib: float | None = None) -> None:
    """Loss, validation accuracy and memory over optimizer steps; the memory panel has the
    plan's predicted peak beside the measured one (GPU), or the process's memory (CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqa.io import save_figure_atomic

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_accuracy"], h.get("eval_loss")) for h in history
             if "eval_accuracy" in h]
    fig, (ax_loss, ax_acc, ax_mem) = plt.subplots(1, 3, figsize=(15, 3.6))
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if evals:
        ax_loss.plot([e[0] for e in evals], [e[2] for e in evals], "o-", label="val loss")
        ax_acc.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:green")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="Validation accuracy",
               ylim=(0, 1))
    ax_acc.axhline(0.25, color="gray", linestyle=":", label="chance")
    ax_acc.legend()
    memory_panel(ax_mem, history, predicted_peak_gib)
    save_figure_atomic(fig, path)
    plt.close(fig)


def memory_panel(ax, history: list[dict], predicted_peak_gib: float | None) -> None:
    series = [("gpu_peak_reserved_gib", "GPU peak reserved"), ("gpu_reserved_gib", "GPU reserved"),
              ("cpu_rss_gib", "process resident (CPU run)")]
    for key, label in series:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), label=label)
    if predicted_peak_gib:
        ax.axhline(predicted_peak_gib, color="tab:red", linestyle="--",
                   label=f"plan's predicted peak {predicted_peak_gib:.1f} GiB")
    ax.set(xlabel="optimizer step", ylabel="GiB", title="Memory")
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
