"""The whole job on the tiny model and a small easy-vqa subset, through the stage functions that
the scripts call: data -> train -> eval -> submit, then the adapter reloaded by peft."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vqa.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    from vqa.easyvqa import write_dataset

    artifacts = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_model_dir, artifacts / "base-model")
    config = _config(artifacts)
    write_dataset(config.data_dir, config.data_train_rows, config.data_test_rows, config.seed)
    return artifacts


def _config(run_dir, *extra):
    return load_config([f"ARTIFACTS_DIR={run_dir}", f"DATA_DIR={run_dir / 'data'}",
                        "DATA_TRAIN_ROWS=160", "DATA_TEST_ROWS=48", "EPOCHS=2", "LR=2e-3",
                        "VAL_SAMPLE=16", "PER_DEVICE_BATCH=8", "PRED_BATCH_SIZE=16", *extra],
                       environ={})


@pytest.mark.slow
def test_train_eval_submit_and_reload(run_dir):
    from vqa.evaluate import evaluate
    from vqa.submit import submit
    from vqa.train import train

    config = _config(run_dir)

    metrics = train(config)
    import torch

    assert metrics["quantized_4bit"] == torch.cuda.is_available()  # QUANT=4bit is CUDA-only
    assert metrics["effective_batch_size"] == 16 and metrics["gradient_accumulation"] == 2
    # 144 training rows (90%), 16 per optimizer step, every row every epoch: 9 steps an epoch.
    assert metrics["train_rows"] == 144 and metrics["optimizer_steps"] == 18
    adapter = run_dir / "lora_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 32
    assert (run_dir / "train_curve.png").stat().st_size > 1000

    report = evaluate(config)
    assert report["validation"]["rows"] == 16 and report["test"]["rows"] == 48
    assert set(report["test"]["per_family"]) <= {"color", "shape", "yes/no"}
    assert (run_dir / "confusion_matrix.png").is_file()
    families = report["test"]["per_family"].values()
    assert report["test"]["accuracy"] == pytest.approx(
        sum(f["accuracy"] * f["rows"] for f in families) / 48)

    submit(config)
    submission = pd.read_csv(run_dir / "submission.csv", dtype=str)
    test = pd.read_csv(config.data_dir / "test.csv", dtype=str)
    # eval scored the test rows in the same batches as submit: its accuracy is the submission's
    key = pd.read_csv(config.data_dir / "test_answers.csv", dtype=str).set_index("id")["answer"]
    right = (submission.set_index("id")["answer"] == key.reindex(submission["id"])).mean()
    assert report["test"]["accuracy"] == pytest.approx(right)
    sample = pd.read_csv(config.data_dir / "sample_submission.csv", dtype=str)
    assert list(submission["id"]) == list(sample["id"])  # sample_submission's order
    assert sorted(submission["id"]) == sorted(test["id"]) and submission["id"].is_unique
    assert set(submission["answer"]) <= set("abcd")

    # The adapter in peft format, reloaded the standard way onto the same base (4-bit on CUDA,
    # full precision on CPU, as submit loads it), gives the same answers.
    from peft import PeftModel
    from transformers import AutoProcessor

    from vqa.model import load_model
    from vqa.predict import predict_rows

    processor = AutoProcessor.from_pretrained(run_dir / "base-model")
    base = load_model(config, for_training=False)
    model = PeftModel.from_pretrained(base, adapter).eval()
    # Same batches as submit: in bf16 a different padding can flip a near-tie of the letters.
    again = predict_rows(model, processor, test.to_dict("records"), config.data_dir,
                         batch_size=config.pred_batch_size)
    assert again.answers == dict(zip(submission["id"], submission["answer"]))

    # generate mode answers every row too, with valid letters.
    generate = _config(run_dir, "INFER_MODE=generate", "MAX_NEW_TOKENS=4")
    report = submit(generate)
    submission = pd.read_csv(run_dir / "submission.csv", dtype=str)
    assert sorted(submission["id"]) == sorted(test["id"]) and set(submission["answer"]) <= set("abcd")
    assert report["unparsed_generations_resolved_by_scoring"] <= len(test)
    letters_only = pd.read_csv(run_dir / "probabilities.csv", dtype=str)  # no probabilities
    assert list(letters_only["answer"]) == list(submission["answer"])
    assert letters_only["p_a"].isna().sum() >= len(test) - report[
        "unparsed_generations_resolved_by_scoring"]

    # TTA=rotate in eval: each row under its 4 option shifts; CircularEval needs every shift
    # right, the unshifted one included, so it is at most the plain accuracy.
    rotated = evaluate(_config(run_dir, "TTA=rotate"))
    v = rotated["validation"]
    assert v["circular_accuracy"] <= v["plain_accuracy"] and v["accuracy"] == v["rotated_accuracy"]
    plain = evaluate(config)["validation"]["accuracy"]
    assert abs(v["plain_accuracy"] - plain) <= 1 / 16  # other batches: a near-tie may flip
    assert sum(v["predicted_letters"].values()) == pytest.approx(1)
    probs = pd.read_csv(run_dir / "validation_probabilities.csv", dtype={"id": str})
    assert len(probs) == 16 and set(probs["true"]) <= set("abcd")
    assert ((probs[["p_a", "p_b", "p_c", "p_d"]].sum(axis=1) - 1).abs() < 1e-4).all()
    assert (run_dir / "letter_bias.png").stat().st_size > 1000

    # CALIBRATE=prior alone: a quarter of the validation rows rotated to estimate the prior
    calibrated = evaluate(_config(run_dir, "CALIBRATE=prior", "CALIBRATE_SHARE=0.25"))
    c = calibrated["validation"]["calibrated"]
    assert c["estimated_on_rows"] == 4 and sum(c["prior"].values()) == pytest.approx(1, abs=1e-3)
    assert calibrated["validation"]["accuracy"] == c["accuracy"]
    assert abs(calibrated["validation"]["plain_accuracy"] - plain) <= 1 / 16
    report = submit(_config(run_dir, "CALIBRATE=prior"))
    assert report["rows_asked"] == 48 + 3 * 3  # ceil(5% of 48) rows under 3 more shifts
    assert report["letter_prior"]["estimated_on_rows"] == 3
    probs = pd.read_csv(run_dir / "probabilities.csv", dtype={"id": str})
    assert ((probs[["p_a", "p_b", "p_c", "p_d"]].sum(axis=1) - 1).abs() < 1e-4).all()


@pytest.mark.slow
def test_scripts_run_from_the_command_line(run_dir):
    """The Make targets' scripts: preflight writes both reports; a bad setting exits 2."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = [f"ARTIFACTS_DIR={run_dir}", f"DATA_DIR={run_dir / 'data'}"]
    done = subprocess.run([sys.executable, "scripts/preflight.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "vqa preflight: runnable" in done.stdout
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["verdict"] == "runnable" and report["data"]["test_rows"] == 48
    assert report["data"]["train_sequence_length"]["max"] > 16  # visual tokens are counted
    assert "# Preflight: runnable" in (run_dir / "preflight.md").read_text()

    bad = subprocess.run([sys.executable, "scripts/train.py", *args, "LORA_R=-1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "vqa train: error: LORA_R=-1: must be positive"

    missing = subprocess.run([sys.executable, "scripts/submit.py", f"ARTIFACTS_DIR={run_dir}",
                              f"DATA_DIR={run_dir / 'nowhere'}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2
    assert "nowhere/test.csv: file not found" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("tta,calibrate", [("none", "none"), ("rotate", "prior")])
def test_submit_killed_mid_run_resumes_without_loss_or_duplicates(run_dir, tmp_path, tta,
                                                                  calibrate):
    """SIGKILL a running `submit`, rerun it: every test id once, finished rows not redone;
    under TTA=rotate every option shift of every row asked once, and CALIBRATE=prior estimates
    its prior on all of them; probabilities.csv sums to 1."""
    import signal
    import time

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in ("base-model", "lora_adapter"):  # the adapter exists when the run test ran
        if (run_dir / name).exists():
            shutil.copytree(run_dir / name, artifacts / name)
    args = [sys.executable, "scripts/submit.py", f"ARTIFACTS_DIR={artifacts}",
            f"DATA_DIR={run_dir / 'data'}", "PRED_BATCH_SIZE=4", f"TTA={tta}",
            f"CALIBRATE={calibrate}"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    journal = artifacts / "predictions.journal.jsonl"
    asked = 48 * (4 if tta == "rotate" else 1)

    slow = subprocess.Popen(args, cwd=ROOT, env={**env, "VQA_FAULT_SLEEP_PER_BATCH": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a few finished batches, then kill
        if journal.is_file() and len(journal.read_text().splitlines()) > 1 + 8:
            break
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    journalled = len(journal.read_text().splitlines()) - 1
    assert 8 < journalled < asked, "the kill should land mid-run"
    assert not (artifacts / "submission.csv").exists()

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    what = "test rows" if tta == "none" else "rows asked (4 option shifts for each rotated row)"
    assert f"resuming: {journalled} of {asked} {what} already predicted" in done.stderr
    submission = pd.read_csv(artifacts / "submission.csv", dtype=str)
    test = pd.read_csv(run_dir / "data" / "test.csv", dtype=str)
    assert sorted(submission["id"]) == sorted(test["id"]) and submission["id"].is_unique
    ids = [json.loads(line)["id"] for line in journal.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == asked  # nothing predicted twice
    report = json.loads((artifacts / "submit_report.json").read_text())
    assert report["resumed_rows"] == journalled and report["tta"] == tta
    if calibrate == "prior":  # under rotation, every row estimates the prior
        assert report["letter_prior"]["estimated_on_rows"] == 48
        assert sum(report["letter_prior"]["prior"].values()) == pytest.approx(1, abs=1e-3)
    probs = pd.read_csv(artifacts / "probabilities.csv", dtype={"id": str})
    assert list(probs["id"]) == list(submission["id"])
    columns = ["p_a", "p_b", "p_c", "p_d"]
    assert ((probs[columns].sum(axis=1) - 1).abs() < 1e-4).all()
    picked = probs[columns].to_numpy().argmax(axis=1)
    assert list(probs["answer"]) == list(submission["answer"]) == ["abcd"[k] for k in picked]
    assert (probs["margin"] >= 0).all()


@pytest.mark.slow
def test_predict_backs_off_on_out_of_memory_and_skips_nothing(run_dir, monkeypatch):
    """Injected OutOfMemoryErrors split the batch; the answers equal an undisturbed run."""
    from transformers import AutoProcessor

    from vqa import predict
    from vqa.model import load_for_inference
    from vqa.oom import FaultInjector

    config = _config(run_dir)
    processor = AutoProcessor.from_pretrained(run_dir / "base-model")
    model, _ = load_for_inference(config, run_dir / "lora_adapter")
    rows = pd.read_csv(config.data_dir / "test.csv", dtype=str).to_dict("records")
    clean = predict.predict_rows(model, processor, rows, config.data_dir, batch_size=16)

    monkeypatch.setattr(predict, "FAULTS", FaultInjector(oom_at={1, 3}))
    hurt = predict.predict_rows(model, processor, rows, config.data_dir, batch_size=16)
    # Attempt 1 (16 rows) fails -> 8 + 8; attempt 3 (the second 8) fails -> 4 + 4; the rest of
    # the run keeps batch 4.
    assert hurt.oom_splits == [16, 8]
    assert hurt.answers.keys() == clean.answers.keys() == {r["id"] for r in rows}
    same = sum(hurt.answers[i] == clean.answers[i] for i in clean.answers)
    assert same >= len(rows) - 1  # padding differs between batch sizes; a near-tie may flip

    monkeypatch.setattr(predict, "FAULTS", FaultInjector(oom_at={1, 2}))
    with pytest.raises(predict.PredictOutOfMemory, match="does not fit in GPU memory even alone"):
        predict.predict_rows(model, processor, rows[:1], config.data_dir, batch_size=1)


@pytest.mark.slow
def test_train_killed_mid_run_resumes_and_a_finished_run_is_not_redone(run_dir, tmp_path):
    import signal
    import time

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copytree(run_dir / "base-model", artifacts / "base-model")
    args = [sys.executable, "scripts/train.py", f"ARTIFACTS_DIR={artifacts}",
            f"DATA_DIR={run_dir / 'data'}", "EPOCHS=3", "LR=2e-3", "VAL_SAMPLE=16",
            "EARLY_STOPPING_PATIENCE=3"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([*args, "PER_DEVICE_BATCH=8"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = artifacts / "checkpoints" / "checkpoint-9" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.is_file() and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let the checkpoint's last files land, then kill inside epoch 2
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert state.is_file() and not (artifacts / "train_metrics.json").exists()

    # Resumed as on another card: the plan there has another micro-batch (and accumulation).
    resumed = subprocess.run([*args, "PER_DEVICE_BATCH=4"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    metrics = json.loads((artifacts / "train_metrics.json").read_text())
    assert metrics["resumed_from"].rsplit("-", 1)[-1] in {"9", "18"}
    assert metrics["optimizer_steps"] == 27  # 3 epochs x 9 steps, not restarted from zero
    adapter = artifacts / "lora_adapter" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns

    again = subprocess.run([*args, "PER_DEVICE_BATCH=2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained with these settings" in again.stderr
    assert adapter.stat().st_mtime_ns == written


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "lora_adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_train_backs_off_on_out_of_memory_with_the_same_effective_batch(run_dir, tmp_path,
                                                                        monkeypatch):
    """Injected OOMs split micro-batches; the optimizer sees the same rows: same adapter."""
    from vqa.train import train

    def run(name: str, **faults: str) -> tuple[dict, dict]:
        artifacts = tmp_path / name
        artifacts.mkdir()
        shutil.copytree(run_dir / "base-model", artifacts / "base-model")
        for key in ("VQA_FAULT_OOM_AT", "VQA_FAULT_OOM_ROWS_ABOVE"):
            monkeypatch.setenv(key, faults.get(key, ""))
        config = load_config([f"ARTIFACTS_DIR={artifacts}", f"DATA_DIR={run_dir / 'data'}",
                              "EPOCHS=1", "LR=2e-3", "VAL_SAMPLE=16", "LORA_DROPOUT=0",
                              "EFFECTIVE_BATCH_SIZE=8", "PER_DEVICE_BATCH=4"], environ={})
        return train(config), _adapter_weights(artifacts)

    clean, clean_weights = run("clean")
    assert clean["out_of_memory_splits"] == []
    # Attempt 2 is the second micro-batch of the first optimizer step: the first is replayed.
    once, once_weights = run("once", VQA_FAULT_OOM_AT="2")
    capped, capped_weights = run("capped", VQA_FAULT_OOM_ROWS_ABOVE="1")

    assert [e["now_rows_per_piece"] for e in once["out_of_memory_splits"]] == [2]
    # A card that fits one row: 4 -> 2 -> 1; shorter micro-batches try 4 rows again and back off.
    capped_sizes = [e["now_rows_per_piece"] for e in capped["out_of_memory_splits"]]
    assert capped_sizes[:2] == [2, 1] and set(capped_sizes) == {1, 2}
    for metrics in (once, capped):
        assert metrics["effective_batch_size"] == clean["effective_batch_size"] == 8
        assert metrics["optimizer_steps"] == clean["optimizer_steps"] == 18
    for weights in (once_weights, capped_weights):
        assert weights.keys() == clean_weights.keys()
        for key, value in clean_weights.items():
            assert torch_allclose(weights[key], value), key


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_train_row_that_cannot_fit_alone_exits_cleanly_and_keeps_the_checkpoint(run_dir,
                                                                                tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copytree(run_dir / "base-model", artifacts / "base-model")
    args = [sys.executable, "scripts/train.py", f"ARTIFACTS_DIR={artifacts}",
            f"DATA_DIR={run_dir / 'data'}", "EPOCHS=2", "LR=2e-3", "VAL_SAMPLE=16",
            "PER_DEVICE_BATCH=8"]
    # 18 micro-batches of 8 make epoch 1 (checkpoint-9); from attempt 20 on nothing fits:
    # 8 rows, replay at 4, then 2, then 1 row -> out of options.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "VQA_FAULT_OOM_AT": ",".join(str(n) for n in range(20, 40))}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.replace("\r", "\n").splitlines()
              if line.startswith("vqa train: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    last = errors[0]
    assert last.startswith("vqa train: error: training row id ")
    assert "does not fit in GPU memory even alone" in last and "MAX_PIXELS" in last
    assert "Traceback" not in done.stderr
    checkpoint = artifacts / "checkpoints" / "checkpoint-9"
    assert (checkpoint / "trainer_state.json").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (artifacts / "train_metrics.json").exists()
    assert not (artifacts / "lora_adapter").exists()


@pytest.mark.slow
def test_broken_images_skip_train_rows_and_test_rows_go_text_only(run_dir, tmp_path):
    """A broken training image skips its rows (listed); a broken test image is asked as text."""
    from vqa.data import DataError
    from vqa.submit import submit
    from vqa.train import train

    data = tmp_path / "data"
    shutil.copytree(run_dir / "data", data)
    train_csv = pd.read_csv(data / "train.csv", dtype=str)
    test_csv = pd.read_csv(data / "test.csv", dtype=str)
    broken_train = train_csv.at[5, "path"]
    (data / broken_train).write_bytes(b"")  # zero bytes
    broken_test = test_csv.at[3, "path"]
    (data / broken_test).write_bytes((data / broken_test).read_bytes()[:40])  # truncated
    artifacts = tmp_path / "artifacts"
    shutil.copytree(run_dir / "base-model", artifacts / "base-model")
    config = load_config([f"ARTIFACTS_DIR={artifacts}", f"DATA_DIR={data}", "EPOCHS=1",
                          "VAL_SAMPLE=16", "PER_DEVICE_BATCH=8", "PRED_BATCH_SIZE=16"],
                         environ={})

    metrics = train(config)
    expected = {r["id"] for r in train_csv.to_dict("records") if r["path"] == broken_train}
    skipped = metrics["skipped_train_rows"]
    assert {s["id"] for s in skipped} == expected and skipped[0]["row"] == 7
    assert "not an image PIL can read" in skipped[0]["reason"]
    assert metrics["train_rows"] + 16 <= len(train_csv) - len(expected)

    report = submit(config)
    text_only = {r["id"] for r in test_csv.to_dict("records") if r["path"] == broken_test}
    assert {r["id"] for r in report["text_only_rows"]} == text_only
    assert report["text_only_rows"][0]["reason"].startswith(str(data / broken_test))
    submission = pd.read_csv(artifacts / "submission.csv", dtype=str)
    assert sorted(submission["id"]) == sorted(test_csv["id"])  # nothing dropped
    assert set(submission["answer"]) <= set("abcd")

    for path in set(train_csv["path"]):  # most images gone: the data folder is wrong
        (data / path).unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"images unusable .* is DATA_DIR right\?"):
        train(load_config([f"ARTIFACTS_DIR={tmp_path / 'other'}", f"DATA_DIR={data}",
                           f"MODEL_ID={artifacts / 'base-model'}", "PER_DEVICE_BATCH=8"],
                          environ={}))


def _plan_lines(text: str, prefix: str) -> list[str]:
    """What follows `prefix` on each line of a stage's output, in order."""
    return [line.split(prefix, 1)[1] for line in text.splitlines() if prefix in line]


@pytest.mark.slow
def test_every_stage_runs_with_the_plan_preflight_made(run_dir, tmp_path):
    """preflight plans for an A10G; train, eval and submit read its plan.json and print the part
    they use in preflight's own words and numbers; a changed input is named and re-planned."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(run_dir / "base-model", artifacts / "base-model")
    data = tmp_path / "data"
    shutil.copytree(run_dir / "data", data)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    common = [f"ARTIFACTS_DIR={artifacts}", f"DATA_DIR={data}", "TARGET_GPU=A10G"]

    def run(script, *settings):
        done = subprocess.run([sys.executable, f"scripts/{script}.py", *common, *settings],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    preflight = run("preflight").stdout
    planned = {stage: _plan_lines(preflight, f"  {stage}: ") for stage in ("train", "submit")}
    saved = json.loads((artifacts / "plan.json").read_text())
    assert saved["made_by"] == "preflight" and saved["plan"]["budget"]["name"].startswith(
        "TARGET_GPU=A10G")
    micro = saved["plan"]["per_device_batch"]
    assert planned["train"][0].startswith(f"PER_DEVICE_BATCH={micro}: ")
    assert any("predicted peak reserved: train" in line for line in planned["train"])
    assert planned["submit"][0].startswith(f"PRED_BATCH_SIZE={saved['plan']['pred_batch_size']}")

    for stage, settings, part in (("train", ["EPOCHS=1", "VAL_SAMPLE=16", "LR=2e-3"], "train"),
                                  ("eval", [], "submit"), ("submit", [], "submit")):
        log = run(stage, *settings).stderr
        assert f"plan: read from {artifacts / 'plan.json'} (made by preflight" in log, stage
        used = [line for line in _plan_lines(log, " INFO plan: ")
                if not line.startswith(("read from", "saved to"))]
        assert used == planned[part], stage
    metrics = json.loads((artifacts / "train_metrics.json").read_text())
    assert metrics["per_device_batch"] == micro
    assert metrics["gradient_accumulation"] == saved["plan"]["gradient_accumulation"]
    assert json.loads((artifacts / "submit_report.json").read_text())["pred_batch_size"] == \
        saved["plan"]["pred_batch_size"]

    # Changed inputs are named, planned again and saved; the plan then serves the next stage.
    test_image = pd.read_csv(data / "test.csv", dtype=str).at[0, "path"]
    from PIL import Image

    Image.new("RGB", (640, 480), (1, 2, 3)).save(data / test_image)
    log = run("submit", "MAX_PIXELS=200704").stderr
    assert (f"plan: inputs changed since {artifacts / 'plan.json'} was made: MAX_PIXELS, images; "
            f"planning again") in log
    assert json.loads((artifacts / "plan.json").read_text())["made_by"] == "submit"
    log = run("submit", "MAX_PIXELS=200704").stderr
    assert "(made by submit" in log and "planning again" not in log


@pytest.mark.slow
def test_folds_train_out_of_fold_submit_averaged_and_ensemble(run_dir, tmp_path):
    """make train FOLDS=2: two adapters, every training row out of fold once, no image on both
    sides of a fold; a rerun trains nothing; make submit FOLDS=2 averages the folds' test
    probabilities; make ensemble of that one run is that run."""
    from vqa.ensemble import ensemble
    from vqa.fold_runs import submit_folds, train_folds
    from vqa.folds import image_groups

    artifacts = tmp_path / "folds"
    artifacts.mkdir()
    shutil.copytree(run_dir / "base-model", artifacts / "base-model")
    config = dataclasses.replace(_config(artifacts, "FOLDS=2", "EPOCHS=1"),
                                 data_dir=run_dir / "data")
    report = train_folds(config)
    train_csv = pd.read_csv(run_dir / "data" / "train.csv", dtype=str)
    oof = pd.read_csv(artifacts / "oof_probabilities.csv", dtype={"id": str})
    assert sorted(oof["id"]) == sorted(train_csv["id"])  # every row out of fold, once
    assert ((oof[["p_a", "p_b", "p_c", "p_d"]].sum(axis=1) - 1).abs() < 1e-4).all()
    groups = image_groups(train_csv, run_dir / "data")
    for k in (0, 1):
        held = set(oof.loc[oof["fold"] == k, "id"])
        trained = set(train_csv["id"]) - held
        assert not {groups[i] for i in held} & {groups[i] for i in trained}
        metrics = json.loads((artifacts / f"fold-{k}" / "train_metrics.json").read_text())
        assert metrics["train_rows"] == len(trained)
        assert (artifacts / f"fold-{k}" / "lora_adapter" / "adapter_config.json").is_file()
    assert report["oof_rows"] == len(train_csv) and len(report["per_fold"]) == 2
    assert report["oof_accuracy"] == pytest.approx((oof["answer"] == oof["true"]).mean(), abs=1e-4)
    assert (artifacts / "folds.png").stat().st_size > 1000
    stamp = (artifacts / "fold-0" / "lora_adapter" / "adapter_model.safetensors").stat().st_mtime
    train_folds(config)  # finished folds are found, not trained again
    assert (artifacts / "fold-0" / "lora_adapter" / "adapter_model.safetensors").stat(
        ).st_mtime == stamp

    submit_folds(config)
    mean = sum(pd.read_csv(artifacts / f"fold-{k}" / "probabilities.csv", dtype={"id": str})
               .set_index("id")[["p_a", "p_b", "p_c", "p_d"]] for k in (0, 1)) / 2
    blended = pd.read_csv(artifacts / "probabilities.csv", dtype={"id": str}).set_index("id")
    assert (blended[["p_a", "p_b", "p_c", "p_d"]] - mean.loc[blended.index]).abs().max().max() \
        < 1e-5
    submission = pd.read_csv(artifacts / "submission.csv", dtype=str)
    test = pd.read_csv(run_dir / "data" / "test.csv", dtype=str)
    assert sorted(submission["id"]) == sorted(test["id"]) and submission["id"].is_unique

    out = tmp_path / "blend"
    ensemble(load_config([f"DATA_DIR={run_dir / 'data'}", f"ARTIFACTS_DIR={out}",
                          f"RUNS={artifacts}"], environ={}))
    assert list(pd.read_csv(out / "submission.csv", dtype=str)["answer"]) == list(
        submission["answer"])
