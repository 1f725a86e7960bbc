#!/usr/bin/env python3
"""make bench-gpus: `make train` and `make submit` on 1 and on NPROC GPUs, same model and data.

Builds a random-init real-size Qwen2.5-VL (BENCH_MODEL, default 3B; vqa/realsize.py), writes
synthetic 448x448 rows with Korean-length questions, then runs the real scripts: train with
NPROC=1 and NPROC=n (4-bit QLoRA, same EFFECTIVE_BATCH_SIZE), submit in score mode with NPROC=1
and n with the adapter trained on one GPU, and checks that the merged submission equals the
single-GPU one byte for byte.
Prints a Markdown table and writes bench_gpus.json to ARTIFACTS_DIR. GPU only.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, artifacts: Path, settings: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, f"scripts/{script}.py",
                               f"ARTIFACTS_DIR={artifacts}", *settings], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"bench-gpus: {script} {' '.join(settings)} failed (exit {done.returncode}); "
                 f"see {log}")
    return time.perf_counter() - started


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench-gpus: no CUDA GPU here; this benchmark runs on a GPU machine only")
        return 0
    sys.path.insert(0, str(ROOT))
    from vqa.config import ConfigError, load_bench_config, load_config
    from vqa.realsize import build_random_model, write_synthetic_data

    try:
        config = load_config(sys.argv[1:], bench=True)
        bench = load_bench_config(sys.argv[1:])
    except ConfigError as exc:
        sys.exit(f"bench-gpus: error: {exc}")
    gpus = torch.cuda.device_count()
    nproc = max(2, config.nproc)  # NPROC=4 compares 1 with 4 GPUs
    if nproc > gpus:
        sys.exit(f"bench-gpus: NPROC={nproc} but only {gpus} GPU(s) here")
    model_name = bench.bench_model
    out = config.artifacts_dir / "bench-gpus"
    out.mkdir(parents=True, exist_ok=True)
    scratch = bench.bench_scratch or Path("/tmp/vqa-bench")
    train_rows, test_rows = bench.bench_train_rows, bench.bench_test_rows

    started = time.perf_counter()
    model_dir = build_random_model(model_name, scratch / "model")
    built = time.perf_counter() - started
    data = write_synthetic_data(scratch / "data", train_rows, test_rows)
    common = [f"MODEL_ID={model_dir}", f"DATA_DIR={data}", "QUANT=4bit", "RETRAIN=1",
              "DATALOADER_WORKERS=4"]
    train_settings = ["EPOCHS=1", "VAL_SAMPLE=32", "PER_DEVICE_BATCH=2",
                      "EFFECTIVE_BATCH_SIZE=16", "EARLY_STOPPING_PATIENCE=1"]
    submit_settings = ["INFER_MODE=score", "PRED_BATCH_SIZE=8"]

    results = {"model": model_name, "gpu": torch.cuda.get_device_name(0), "gpus": gpus,
               "build_and_save_s": round(built, 1), "train_rows": train_rows,
               "test_rows": test_rows, "runs": {}}
    for ranks in (1, nproc):
        name = f"nproc{ranks}"
        artifacts = scratch / name
        wall = run("train", artifacts, [*common, *train_settings, f"NPROC={ranks}"],
                   out / f"train_{name}.log")
        metrics = json.loads((artifacts / "train_metrics.json").read_text())
        results["runs"][name] = {
            "train_wall_s": round(wall, 1),
            "optimizer_steps": metrics["optimizer_steps"],
            "effective_batch_size": metrics["effective_batch_size"],
            "gradient_accumulation": metrics["gradient_accumulation"],
            "median_step_s": metrics["median_step_seconds"],
            "steady_samples_per_s": metrics["steady_samples_per_second"],
            "train_peak_reserved_gib_rank0": metrics["peak_reserved_gib_rank0"],
        }
        (out / "bench_gpus.json").write_text(json.dumps(results, indent=2))  # kept if cut short
    # Both submits predict with the adapter trained on one GPU, so the files must be equal.
    shared = scratch / "submit-shared-adapter"
    shutil.rmtree(shared, ignore_errors=True)
    shutil.copytree(scratch / "nproc1" / "lora_adapter", shared / "lora_adapter")
    for ranks in (1, nproc):
        name = f"nproc{ranks}"
        artifacts = scratch / name if ranks == 1 else shared
        wall_submit = run("submit", artifacts, [*common, *submit_settings, f"NPROC={ranks}"],
                          out / f"submit_{name}.log")
        report = json.loads((artifacts / "submit_report.json").read_text())
        results["runs"][name].update(submit_wall_s=round(wall_submit, 1),
                                     predict_s=report["predict_seconds"],
                                     predict_s_per_row=report["seconds_per_row"])
        (out / "bench_gpus.json").write_text(json.dumps(results, indent=2))
    one = (scratch / "nproc1" / "submission.csv").read_bytes()
    many = (shared / "submission.csv").read_bytes()
    results["identical_submissions"] = one == many
    a, b = results["runs"]["nproc1"], results["runs"][f"nproc{nproc}"]
    results["train_speedup"] = round(b["steady_samples_per_s"] / a["steady_samples_per_s"], 2)
    results["predict_speedup"] = round(a["predict_s"] / b["predict_s"], 2)
    (out / "bench_gpus.json").write_text(json.dumps(results, indent=2))

    print(f"\n{model_name} (random init, 4-bit NF4), {results['gpu']}, {train_rows} train / "
          f"{test_rows} test rows at 448x448\n")
    print("| GPUs | train s/step (batch 16) | train samples/s | peak reserved rank 0 GiB "
          "| predict s/row | submit wall s |")
    print("|---|---|---|---|---|---|")
    for ranks in (1, nproc):
        r = results["runs"][f"nproc{ranks}"]
        print(f"| {ranks} | {r['median_step_s']:.2f} | {r['steady_samples_per_s']:.1f} | "
              f"{r['train_peak_reserved_gib_rank0']:.1f} | {r['predict_s_per_row']:.4f} | "
              f"{r['submit_wall_s']:.0f} |")
    print(f"\ntrain speed-up {results['train_speedup']}x, predict speed-up "
          f"{results['predict_speedup']}x; merged submission identical to one GPU's: "
          f"{results['identical_submissions']}")
    return 0 if results["identical_submissions"] else 1


if __name__ == "__main__":
    sys.exit(main())
