"""When the stage and the whole job will end, shown beside each stage's progress bar.

A stage's end comes from its own measured pace (what the bar counts so far). The job's end adds
the stages still to come after it (training is followed by make submit) at the plan's predicted
time (vqa/planning/timing.py), scaled by how this stage's measured pace compares with its own
prediction: a run going 20% slower than predicted is assumed to stay so.
"""

from __future__ import annotations

import time

# the plan's predicted seconds (Plan.predicted) of the stages that follow each stage in a job
LATER = {"train": ("submit_s",), "eval": (), "submit": ()}
STAGE = {"train": "train_worst_s", "eval": "eval_s", "submit": "submit_s"}


def clock(at: float, now: float) -> str:
    """A time of day, with the weekday when it is not within the next 24 hours."""
    local = time.localtime(at)
    return time.strftime("%H:%M" if at - now < 86400 else "%a %H:%M", local)


def ends_at(elapsed: float, done: float, remaining: float, now: float) -> float:
    """When `remaining` units will be done at the pace of `done` in `elapsed` seconds."""
    return now + elapsed / done * max(0.0, remaining)


def postfix(stage: str, elapsed: float, done: float, remaining: float, whole: float,
            predicted: dict | None, now: float | None = None) -> str:
    """`train ends 14:05, job ends 14:40` after `done` units in `elapsed` seconds with
    `remaining` to go, of a stage of `whole` units; the job's end only where the plan predicted
    the stage and those after it."""
    if done <= 0 or whole <= 0:
        return ""
    now = time.time() if now is None else now
    pace = elapsed / done
    stage_end = ends_at(elapsed, done, remaining, now)
    text = f"{stage} ends {clock(stage_end, now)}"
    later = [predicted.get(k) for k in LATER[stage]] if predicted else []
    own = (predicted or {}).get(STAGE[stage])
    if later and own and all(s is not None for s in later):
        ratio = pace * whole / own  # measured over predicted, for this stage
        text += f", job ends {clock(stage_end + ratio * sum(later), now)}"
    return text


def bar_postfix(bar) -> str:
    """`ends 14:05` for a tqdm bar: when its rows will be done at its pace so far."""
    if not bar.n or not bar.total:
        return ""
    now = time.time()
    return f"ends {clock(ends_at(bar.format_dict['elapsed'], bar.n, bar.total - bar.n, now), now)}"


def job_clock(predicted: dict | None):
    """A Trainer callback that writes `postfix` onto the training progress bar after every
    optimizer step (its `progress` attribute: the Trainer's ProgressCallback, set once the
    Trainer is built)."""
    from transformers import TrainerCallback

    class JobClock(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.started = None
            self.predicted = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.perf_counter(), state.global_step
            # the epochs this run trains, which may differ from those the plan was made at
            self.predicted = (dict(predicted, train_worst_s=predicted["train_epoch_s"]
                                   * args.num_train_epochs) if predicted else None)

        def on_step_end(self, args, state, control, **kwargs):
            bar = getattr(self.progress, "training_bar", None)
            if bar is None or self.started is None:
                return
            # a resumed run counts its pace from the steps it ran itself
            done = state.global_step - self.first_step
            text = postfix("train", time.perf_counter() - self.started, done,
                           state.max_steps - state.global_step, state.max_steps, self.predicted)
            if text:
                bar.set_postfix_str(text, refresh=False)

    return JobClock()
