"""The plan in words: the sentences behind each choice, the verdict, preflight.md, and the part of
the plan each stage prints. Nothing here computes; it renders a `Plan` (as saved) and
preflight's report.
"""

from __future__ import annotations

from vqa.planning.hardware import GIB

# The settings each stage runs with, in the order they are printed.
STAGE_KNOBS = {
    "train": ("PER_DEVICE_BATCH", "UNCHECKPOINTED_LAYERS", "UNCHECKPOINTED_ATTENTION"),
    "eval": ("PRED_BATCH_SIZE",),
    "submit": ("PRED_BATCH_SIZE",),
}


def kept_words(layers: int, attention: int) -> str:
    """'last 6 layers kept', '... + 3 attention blocks kept below', for tables."""
    words = f"last {layers} layers kept" if layers else ""
    if attention:
        words += f"{' + ' if words else ''}{attention} attention blocks kept below"
    return words


def _beyond(d: dict, planned: float) -> str:
    return (f"{d['next_value']} would need {d['next_reserved_gib']:.2f} GiB, more than the "
            f"{planned:.2f} planned")


def reason(d: dict, plan: dict) -> str:
    """The sentence behind one Decision (as saved in the plan)."""
    knob, value, source = d["knob"], d["value"], d["source"]
    head = f"{knob}={value}"
    if source == "user":
        return f"{head} set by the user"
    if source == "cpu":
        return f"{head}: CPU run" + (", RAM is no constraint for it"
                                     if knob == "PER_DEVICE_BATCH" else "")
    if source == "fallback":
        return f"{head}: no architecture to plan from (a conservative default)"
    if source == "family":
        return f"{head}: every decoder layer is checkpointed: {plan['budget']['keeps_reason']}"
    planned = plan["budget"]["planned_gib"]
    if d["stop"] == "nothing fits":
        return f"{head}: nothing fits; see the suggested MAX_PIXELS"
    if knob == "PER_DEVICE_BATCH":
        stop = (f"the next divisor, {d['next_value']}, is predicted at "
                f"{d['next_reserved_gib']:.1f} GiB" if d["stop"] == "memory"
                else f"it is the whole effective batch per GPU ({d['of']})")
        return (f"{head}: the largest micro-batch dividing the effective batch whose predicted "
                f"peak fits ({d['reserved_gib']:.1f} GiB); {stop}")
    if knob == "PRED_BATCH_SIZE":
        mode = plan["infer_mode"]
        if d["stop"] == "memory":
            stop = f"{d['next_value']} is predicted at {d['next_reserved_gib']:.2f} GiB"
        elif d["stop"] == "ceiling":
            stop = (f"{value} is the ceiling: {mode} throughput does not grow beyond it "
                    f"(MAX_PRED_BATCH)")
        else:
            stop = f"{value} is the ceiling: it holds every row to predict ({d['of']})"
        return (f"{head}: the largest {mode} batch whose predicted peak on the longest rows "
                f"fits ({d['reserved_gib']:.1f} GiB); {stop}")
    micro = plan["per_device_batch"]
    if knob == "UNCHECKPOINTED_LAYERS":
        if d["stop"] == "whole":
            return (f"{head}: the memory micro-batch {micro} leaves holds every decoder layer's "
                    f"activations ({d['reserved_gib']:.1f} GiB): gradient checkpointing is off")
        held = (f"keeps the activations of the last {value} of {d['of']} decoder layers for the "
                f"backward pass instead of recomputing them ({d['reserved_gib']:.1f} GiB)"
                if value else "holds no decoder layer's activations: each is recomputed")
        return f"{head}: the memory micro-batch {micro} leaves {held}; {_beyond(d, planned)}"
    if d["stop"] == "whole":
        return (f"{head}: every layer below the kept ones keeps its attention's activations "
                f"({d['reserved_gib']:.1f} GiB)" if d["of"] else f"{head}: no layer is "
                f"checkpointed")
    return (f"{head}: {value} layers below the kept ones keep their attention's activations and "
            f"recompute only their MLP ({d['reserved_gib']:.1f} GiB); {_beyond(d, planned)}")


def budget_line(plan: dict) -> str | None:
    b = plan["budget"]
    if not b:
        return None
    why = ("" if b.get("calibrated", True) else
           f": the peak-VRAM model is not yet checked on {b['family']}'s own measured peaks")
    if b.get("margin_reason"):
        why += f", and {b['margin_reason']}" if why else f": {b['margin_reason']}"
    return (f"{b['name']}: {b['usable_gib']:.1f} GiB usable after the CUDA context, planned to "
            f"{b['planned_gib']:.1f} GiB ({b['margin']:.0%} margin{why})")


def ranks_lines(plan: dict) -> list[str]:
    lines = []
    micro, accumulation, per_host = (plan["per_device_batch"], plan["gradient_accumulation"],
                                     plan["nproc"])
    nodes = plan.get("nnodes", 1)
    ranks = per_host * nodes
    if plan["gpus_found"]:
        lines.append(f"{plan['gpus_found']} GPU(s) found; the plan is per GPU")
        if per_host > plan["gpus_found"]:
            lines.append(f"NPROC={per_host} exceeds the {plan['gpus_found']} GPU(s) found: set "
                         f"NPROC={plan['gpus_found']} or fewer")
    if ranks > 1:
        where = f"NPROC={per_host} x NNODES={nodes}" if nodes > 1 else f"NPROC={ranks}"
        lines.append(f"{where}: micro-batch {micro} x accumulation {accumulation} x "
                     f"{ranks} ranks = {micro * accumulation * ranks} per optimizer step; each "
                     f"rank predicts every {ranks}th batch")
    if micro * accumulation * ranks != plan["effective_batch_size"]:
        lines.append(f"EFFECTIVE_BATCH_SIZE={plan['effective_batch_size']} is not a multiple of "
                     f"micro-batch x ranks: {micro * accumulation * ranks} is used")
    return lines


def reasons(plan: dict) -> list[str]:
    """Every sentence behind the plan, in the order preflight.md lists them."""
    lines = [line for line in [budget_line(plan)] if line]
    lines += [reason(d, plan) for d in plan["decisions"]]
    if plan["budget"]:
        lines.append(f"predicted peak reserved: train {plan['train_peak']['reserved_gib']:.1f} "
                     f"GiB at micro-batch {plan['per_device_batch']} on its heaviest batch, "
                     f"{plan['infer_mode']} {plan['predict_peak']['reserved_gib']:.1f} GiB at "
                     f"batch {plan['pred_batch_size']}")
    if plan.get("suggested_max_pixels"):
        lines.append(f"MAX_PIXELS={plan['suggested_max_pixels']} "
                     f"({plan['suggested_visual_tokens']} visual tokens an image at most) makes "
                     f"every row fit")
    return lines + ranks_lines(plan)


def warnings(plan: dict) -> list[str]:
    usable = plan["budget"]["usable_gib"] if plan["budget"] else None
    return [f"{w['knob']}={w['value']} is predicted to need {w['reserved_gib']:.1f} GiB, more "
            f"than the {usable:.1f} GiB usable: it will run out of memory (the OOM back-off then "
            f"splits batches)" for w in plan["over_memory"]]


def blocking(plan: dict) -> list[str]:
    name = plan["budget"]["name"] if plan["budget"] else ""
    budget = (plan.get("time_budget") or {}).get("blocking")
    return [f"{b['work']} is predicted to peak at {b['reserved_gib']:.1f} GiB, more than the "
            f"{b['planned_gib']:.1f} GiB planned on {name}" for b in plan["blocking"]] + (
        [budget] if budget else [])


def budget_table(plan: dict) -> list[str]:
    """TIME_BUDGET's trade, one candidate resolution a row: what was chosen and why the larger
    ones were not ([] without a budget)."""
    from vqa.planning.timing import hours

    b = plan.get("time_budget")
    if not b:
        return []
    chosen = f"MAX_PIXELS={b['chosen_max_pixels']}" + (f", EPOCHS={b['epochs']}" if b["note"]
                                                       or b["blocking"] else "")
    return [f"TIME_BUDGET={b['budget']} ({hours(b['budget_s'])}) on {b['card']}: {chosen}"
            + (f" ({b['note']})" if b["note"] else ""),
            *trade_table(b["rows"], b["chosen_max_pixels"], "chosen")]


def resolution_lines(report: dict) -> list[str]:
    """preflight's trade of resolution against memory and time when no TIME_BUDGET chose."""
    r = report.get("resolutions")
    if not r:
        return []
    return [f"resolution against time on {r['card']} (TIME_BUDGET=6h or 30min picks from "
            f"it): this run is MAX_PIXELS={r['current']}",
            *trade_table(r["rows"], r["current"], "this run")]


def trade_table(rows: list[dict], current: int, label: str) -> list[str]:
    """Resolution against visual tokens, peak memory and hours (budget.trade's rows), the row
    at MAX_PIXELS=`current` marked `label`, each other one over memory or over the budget."""
    from vqa.planning.timing import hours

    lines = ["| MAX_PIXELS | visual tokens median / max | peak GiB train / predict | train, "
             "every epoch | submit | total | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = (label if r["max_pixels"] == current else
                "over memory" if not r["fits_memory"] else
                "over budget" if r["fits_time"] is False else "")
        peaks = " / ".join("-" if g is None else f"{g:.1f}" for g in (r["train_gib"],
                                                                     r["predict_gib"]))
        lines.append(f"| {r['max_pixels']:,} | {r['visual_median']:g} / {r['visual_max']} | "
                     f"{peaks} | {hours(r['train_s'])} | {hours(r['submit_s'])} | "
                     f"{hours(r['total_s'])} | {mark} |")
    return lines


def stage_lines(plan: dict, stage: str) -> list[str]:
    """What `stage` (train, eval, submit) runs with, in the plan's own numbers."""
    knobs = STAGE_KNOBS[stage]
    lines = [reason(d, plan) for d in plan["decisions"] if d["knob"] in knobs]
    if stage == "train":
        micro, accumulation = plan["per_device_batch"], plan["gradient_accumulation"]
        ranks = plan["nproc"] * plan.get("nnodes", 1)
        lines.append(f"micro-batch {micro} x accumulation {accumulation} x {ranks} rank(s) = "
                     f"{micro * accumulation * ranks} rows per optimizer step")
    peak = plan["train_peak" if stage == "train" else "predict_peak"]
    if peak and plan["budget"]:
        work = "train" if stage == "train" else plan["infer_mode"]
        lines.append(f"predicted peak reserved: {work} {peak['reserved_gib']:.1f} GiB of "
                     f"{plan['budget']['usable_gib']:.1f} usable on {plan['budget']['name']}")
    return lines


def verdict_line(plan: dict) -> str:
    if not plan["budget"]:
        return (f"{plan['verdict']}: {plan['per_device_batch']} x {plan['gradient_accumulation']}"
                f" accumulation, prediction batch {plan['pred_batch_size']}")
    kept = [f"{knob}={plan[key]}" for knob, key in (
        ("UNCHECKPOINTED_LAYERS", "uncheckpointed_layers"),
        ("UNCHECKPOINTED_ATTENTION", "uncheckpointed_attention")) if plan.get(key)]
    return (f"{plan['verdict']} on {plan['budget']['name']}: train peak "
            f"{plan['train_peak']['reserved_gib']} GiB at PER_DEVICE_BATCH="
            f"{plan['per_device_batch']}{' with ' + ' '.join(kept) if kept else ''}, "
            f"predict peak {plan['predict_peak']['reserved_gib']} GiB at PRED_BATCH_SIZE="
            f"{plan['pred_batch_size']}, of {plan['budget']['usable_gib']} GiB usable")


def plan_settings(plan: dict) -> str:
    """The settings line that reproduces the plan."""
    line = f"PER_DEVICE_BATCH={plan['per_device_batch']} PRED_BATCH_SIZE={plan['pred_batch_size']}"
    if plan.get("budget"):  # planned from memory: the layers kept are part of the plan
        line += (f" UNCHECKPOINTED_LAYERS={plan.get('uncheckpointed_layers') or 0}"
                 f" UNCHECKPOINTED_ATTENTION={plan.get('uncheckpointed_attention') or 0}")
    if plan.get("suggested_max_pixels"):
        line += f" MAX_PIXELS={plan['suggested_max_pixels']}"
    return line


def _candidate_work(c: dict) -> str:
    kept = kept_words(c.get("layers_kept", 0), c.get("attention_kept", 0))
    return f"{c['work']}, {kept}" if kept else c["work"]


def preflight_markdown(report: dict) -> str:
    data, plan, machine = report["data"], report["plan"], report["machine"]
    lines = [f"# Preflight: {report['verdict']}", "", f"**{verdict_line(plan)}**", ""]
    for text in report["blocking"]:
        lines.append(f"- **Blocking:** {text}")
    for text in report["warnings"]:
        lines.append(f"- **Warning:** {text}")
    lines += ["", "## Machine", ""]
    if machine["gpus"]:
        for gpu in machine["gpus"]:
            lines.append(f"- GPU {gpu['index']}: {gpu['name']}, {gpu['total_bytes'] / GIB:.1f} GiB "
                         f"({gpu['free_bytes'] / GIB:.1f} free), compute "
                         f"{gpu['compute_capability']}"
                         f", bf16 {'yes' if gpu['bf16'] else 'no'}, other processes "
                         f"{gpu['other_processes_bytes'] / GIB:.1f} GiB")
        lines.append(f"- Driver {machine['driver_version']}, CUDA {machine['cuda_driver_version']}")
    else:
        lines.append(f"- No NVIDIA GPU or driver ({machine['nvml_error']}).")
    lines += [f"- RAM: {machine['ram_available_bytes'] / GIB:.1f} GiB available of "
              f"{machine['ram_total_bytes'] / GIB:.1f}",
              f"- Free disk under the artifacts: {machine['disk_free_bytes'] / GIB:.1f} GiB",
              "", "## Data", "",
              f"- Model: `{report['model_id']}`; architecture from "
              f"{report['architecture_source'] or 'nowhere (not planned)'}",
              f"- Rows measured with {report['measured_with']}; pixels per image "
              f"{data['pixels']['min_pixels']:,} to {data['pixels']['max_pixels']:,}",
              f"- train.csv: {data['train_rows']} rows, answer letters {data['train_letters']}",
              f"- test.csv: {data['test_rows']} rows",
              "", "| tokens | min | median | p95 | max |", "|---|---|---|---|---|"]
    for name, d in (("train sequence", data["train_sequence_length"]),
                    ("test sequence", data["test_sequence_length"]),
                    ("visual per image", data["visual_tokens"])):
        if d:
            lines.append(f"| {name} | {d['min']} | {d['median']} | {d['p95']} | {d['max']} |")
    if data["longest_rows"]:
        lines += ["", "Longest rows: " + ", ".join(
            f"{r['id']} ({r['width']}x{r['height']}, {r['visual_tokens']} visual, "
            f"{r['length']} total)" for r in data["longest_rows"])]
    times = report.get("time") or {}
    lines += ["", "## Time", ""]
    if "skipped" in times:
        lines.append(f"- Not predicted: {times['skipped']}")
    elif times:
        from vqa.planning.timing import time_lines

        lines += [f"- {line}" for line in time_lines(times)]
    table = budget_table(plan) or resolution_lines(report)
    if table:
        lines += ["", "## Resolution against time", "", table[0], "", *table[1:]]
    lines += ["", "## Plan", ""]
    if plan["budget"]:
        b = plan["budget"]
        lines += [f"Planned for {b['name']}: {b['usable_gib']} GiB usable after the CUDA context, "
                  f"filled to at most {b['planned_gib']} GiB ({b['margin']:.0%} margin for the "
                  f"model's error; docs/BENCHMARKS.md). Predicted peak reserved, heaviest batch "
                  f"the data can form:", "",
                  "| work | batch | predicted allocated GiB | predicted reserved GiB | fits |",
                  "|---|---|---|---|---|"]
        for c in plan["candidates"]:
            fits = "yes" if c["reserved_gib"] <= b["planned_gib"] else "no"
            lines.append(f"| {_candidate_work(c)} | {c['batch']} | {c['allocated_gib']} | "
                         f"{c['reserved_gib']} | {fits} |")
        for work, peak in (("training", "train_peak"), ("prediction", "predict_peak")):
            if plan[peak]:  # a prediction's terms are those of its larger phase
                lines += ["", f"Where the {work} peak goes: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in plan[peak]["terms_gib"].items() if v) + " (GiB)."]
        lines.append("")
    lines += [f"- {r}" for r in reasons(plan)]
    lines += ["", "Set these to change it:", "", "```", plan_settings(plan), "```", "",
              f"## Row problems ({len(report['problems'])})", ""]
    if report["problems"]:
        lines += ["| file | row | id | path | problem | what happens |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['file']} | {p['row']} | {p['id']} | {p['path']} | {p['reason']} | "
                  f"{p['action']} |" for p in report["problems"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
