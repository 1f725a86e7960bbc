"""The Docker files, checked without a Docker engine: hadolint, docker-compose's own parser, and
what the image installs. The tools come from requirements-tools.lock (`make tools`, which
`make test` runs first)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vqa.config import KNOBS

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("VQA_TOOLS", ROOT / ".tools"))
# Settings the compose file fixes to its mount points instead of passing them through.
MOUNTED = {"DATA_DIR", "ARTIFACTS_DIR"}


def _tool(name: str) -> str:
    path = TOOLS / "bin" / name
    assert path.is_file(), f"{path} missing: run `make tools` (make test does)"
    return str(path)


def _compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_hadolint_passes():
    done = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_parses_and_reserves_the_gpu():
    import yaml

    done = _compose("--profile", "cpu", "config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    vqa = config["services"]["vqa"]
    device = vqa["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert int(device["count"]) == 1
    mounts = {}  # target -> (source, mode), from compose's "source:target:mode"
    for volume in vqa["volumes"]:
        source, target, mode = volume.split(":")
        mounts[target] = (source, mode)
    assert mounts["/data"][1] == "ro"
    assert mounts["/artifacts"] == ("artifacts", "rw") and "artifacts" in config["volumes"]
    assert mounts["/cache/huggingface"] == ("hf-cache", "rw") and "hf-cache" in config["volumes"]
    assert "HF_HOME=/cache/huggingface" in (ROOT / "Dockerfile").read_text()
    assert vqa["shm_size"]
    assert config["services"]["demo"]["command"][:2] == ["make", "demo"]
    assert "deploy" not in config["services"]["demo"]  # the CPU demo needs no GPU


def test_every_setting_passes_through_compose_and_is_documented_in_env_example(tmp_path):
    import yaml

    values = {knob: f"v-{knob.lower()}" for knob in KNOBS}
    done = _compose("config", env=values)
    assert done.returncode == 0, done.stderr
    environment = yaml.safe_load(done.stdout)["services"]["vqa"]["environment"]
    for knob in KNOBS:
        if knob in MOUNTED:
            assert environment[knob] in ("/data", "/artifacts")
        else:
            assert environment[knob] == values[knob], knob
    unset = yaml.safe_load(_compose("config").stdout)["services"]["vqa"]["environment"]
    assert all(unset[k] in ("", None) for k in KNOBS if k not in MOUNTED)  # defaults: vqa's own

    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert set(KNOBS) - MOUNTED <= documented
    # The example itself is a valid .env: compose reads it.
    (tmp_path / ".env").write_text(example)
    done = subprocess.run([_tool("docker-compose"), "--project-directory", str(tmp_path), "-f",
                           str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_env_example_states_each_settings_default_as_vqa_has_it():
    """Each `# default X` above a setting in .env.example is that setting's default in
    vqa/config.py (it once said 0 for DATALOADER_WORKERS, whose default is auto)."""
    import dataclasses
    from typing import get_type_hints

    from vqa.config import Config, _parse_value

    lines = (ROOT / ".env.example").read_text().splitlines()
    hints = get_type_hints(Config)
    defaults = {f.name.upper(): f.default for f in dataclasses.fields(Config)}
    checked = 0
    for n, line in enumerate(lines):
        knob = line.split("=", 1)[0]
        if knob not in defaults or knob in MOUNTED:
            continue
        comment = next(lines[i] for i in range(n - 1, -1, -1)
                       if lines[i].startswith("# default "))
        stated = re.match(r"# default (\"[^\"]*\"|[^:\s]+)", comment).group(1).strip('"')
        assert _parse_value(knob, stated, hints[knob.lower()]) == defaults[knob], knob
        checked += 1
    assert checked == len(set(defaults) - MOUNTED - {"MODEL_ID"}) + 1


def _lock(name: str = "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned with =="
            pins[package.lower().replace("_", "-")] = version
    return pins


def test_the_image_installs_exactly_the_lock():
    """The Dockerfile installs nothing but `make setup`, which installs the lock with
    --no-deps and checks it; this venv, made the same way, holds exactly the lock."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = " ".join(re.findall(r"^RUN (.*(?:\\\n.*)*)", dockerfile, re.M))
    assert "pip install" not in runs and "uv " not in runs and "conda" not in runs
    assert "make setup" in runs
    assert re.search(r"^COPY .*requirements\.lock", dockerfile, re.M)
    makefile = (ROOT / "Makefile").read_text()
    setup = makefile[makefile.index("$(STAMP): requirements.lock"):].split("\n\n")[0]
    installs = [line for line in setup.splitlines() if "install" in line]
    assert len(installs) == 1 and installs[0].endswith("--no-deps -r requirements.lock")
    assert "pip check" in setup

    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze",
                             "--exclude", "pip"], capture_output=True, text=True, check=True)
    installed = {}
    for line in freeze.stdout.splitlines():
        package, _, version = line.partition("==")
        installed[package.lower().replace("_", "-")] = version
    assert installed == _lock()
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_base_image_cuda_matches_the_locked_torch_build():
    import torch

    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+$",
                      (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "the base image must be an nvidia/cuda runtime image"
    assert torch.version.cuda, "the locked torch must be a CUDA build (it runs on CPU too)"
    torch_major, torch_minor = map(int, torch.version.cuda.split(".")[:2])
    assert int(base.group(1)) == torch_major and int(base.group(2)) >= torch_minor
    runtime = _lock()["nvidia-cuda-runtime"]
    assert int(runtime.split(".")[0]) == torch_major
    assert _lock()["torch"] == torch.__version__.split("+")[0]
    python = re.search(r"python3\.(\d+)-venv", (ROOT / "Dockerfile").read_text())
    assert python and int(python.group(1)) == sys.version_info.minor  # the lock's Python


def test_dockerignore_keeps_data_artifacts_and_venvs_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".tools", "artifacts", "data", ".git"} <= ignored


@pytest.mark.parametrize("target", ["preflight", "train", "submit"])
def test_readme_shows_the_compose_commands(target):
    assert f"docker compose run --rm vqa make {target}" in (ROOT / "README.md").read_text()


def test_the_multinode_service_uses_the_host_network_and_shared_artifacts():
    import yaml

    done = _compose("--profile", "multinode", "config",
                    env={"HOST_ARTIFACTS_DIR": "/mnt/nfs/run1", "NNODES": "2", "NODE_RANK": "1",
                         "MASTER_ADDR": "10.0.0.1"})
    assert done.returncode == 0, done.stderr
    node = yaml.safe_load(done.stdout)["services"]["node"]
    assert node["network_mode"] == "host"
    assert "/mnt/nfs/run1:/artifacts:rw" in node["volumes"]  # a host path, not a named volume
    env = node["environment"]
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"]) == ("2", "1", "10.0.0.1")
    assert node["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "docker compose --profile multinode run --rm node make train" in (
        ROOT / "README.md").read_text()
