"""Planning a run: will it fit, with which batches, and why. Read the files in this order:

- hardware.py: the machine (NVML, RAM, disk), the card table (gpus.json), the memory budget
- shapes.py: a checkpoint's shapes from its config.json (or architectures.json), visual tokens
- rows.py: the data scan: each row's image size and tokens, row problems, the workload
- peaks.py: the peak-VRAM model of a training step and a prediction batch
- calibration.py: the measured peaks it was fitted to and is checked against (calibration.csv)
- planner.py: the batch sizes and checkpointing, each choice with what decided it
- runplan.py: the plan made once, saved to ARTIFACTS_DIR/plan.json, read by every stage
- report.py: the plan and preflight's report in words (preflight.md, what the stages print)
"""
