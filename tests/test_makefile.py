"""The Make targets forward settings given as arguments or environment to the scripts."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make(*args, env=None):
    # A `make test` above us would otherwise pass its own flags and overrides down.
    clean = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**clean, **(env or {})})


def test_help_is_the_default_goal_and_lists_every_target():
    out = _make().stdout
    for target in ["setup", "data", "model", "preflight", "train", "eval", "submit", "demo", "test"]:
        assert f"  {target} " in out


def test_argument_settings_reach_the_script(tmp_path):
    done = _make("train", "LORA_RR=16", f"ARTIFACTS_DIR={tmp_path}")
    assert done.returncode != 0
    assert "vqa train: error: unknown setting LORA_RR (did you mean LORA_R?)" in done.stderr


def test_environment_settings_reach_the_script(tmp_path):
    done = _make("submit", env={"INFER_MODE": "beam", "ARTIFACTS_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert "vqa submit: error: INFER_MODE='beam': must be one of score, generate" in done.stderr


def test_setup_says_in_one_line_when_the_disk_cannot_hold_a_new_venv(tmp_path):
    venv = tmp_path / "venv"
    done = _make("setup", f"VENV={venv}", "VENV_GIB=100000000")
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("setup:")]
    assert len(said) == 1 and "GiB free on this disk" in said[0] and "100000000 GiB" in said[0]
    assert not venv.exists()  # stopped before making it
