"""Checkpoints and --resume: a run killed with SIGKILL mid-epoch continues and ends exactly like an unkilled one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, cli_args
from craft_deploy import CraftError
from craft_deploy.artifacts import partial_dir
from craft_deploy.config import FinetuneConfig
from craft_deploy.finetune import run

# three epochs long enough (48 px) that a kill after the first checkpoint lands inside the second epoch
# on the CPU: bit-exact resumption is a CPU property (cuDNN picks kernels per run; measured 1.6e-5 apart on an H100)
RUN = {**TINY, "epochs": 3, "img_size": 48, "optimizer": "sam", "device": "cpu"}
CLI_ARGS = cli_args(RUN)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    rec = run(FinetuneConfig(**RUN), out)
    return out, rec


def test_killed_run_resumes_and_matches_an_unkilled_one(uninterrupted, tmp_path):
    full_out, full = uninterrupted
    out = tmp_path / "killed"
    ckpt = partial_dir(out) / "checkpoint.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "craft_deploy.cli.main", "finetune", *CLI_ARGS, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint in time"
    time.sleep(0.3)  # into epoch 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written where the result goes
    streamed = json.loads((partial_dir(out) / "finetune.json").read_text())
    assert streamed["status"] == "running" and len(streamed["history"]) == 1  # killed inside epoch 2
    assert (partial_dir(out) / "history.csv").read_text().startswith("epoch,train_loss")

    with pytest.raises(CraftError, match="continue it with --resume"):
        run(FinetuneConfig(**RUN), out)  # a plain re-run must not silently discard the checkpoint
    rec = run(FinetuneConfig(**RUN), out, resume=out)

    assert rec["status"] == "complete" and rec["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
    for a, b in zip(rec["history"], full["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=1e-9)
    assert rec["metrics"]["test_top1"] == pytest.approx(full["metrics"]["test_top1"], abs=1e-9)
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(full_out / "model.safetensors"))
    for k in theirs:
        assert torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-5), k
    assert not (out / "checkpoint.pt").exists() and not partial_dir(out).exists()


def test_interrupted_run_keeps_its_checkpoint_and_refuses_another_config(tmp_path, monkeypatch):
    from craft_deploy.finetune import trainer

    original = trainer.save_checkpoint

    def save_then_interrupt(path, state):  # a Ctrl-C right after the first checkpoint
        original(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        run(FinetuneConfig(**{**RUN, "epochs": 2}), out)
    monkeypatch.undo()
    assert (partial_dir(out) / "checkpoint.pt").is_file() and not out.exists()
    other = FinetuneConfig(**{**RUN, "epochs": 2, "model": "test_resnet"})
    with pytest.raises(CraftError, match="model: 'test_efficientnet' in the checkpoint, 'test_resnet' now"):
        run(other, tmp_path / "b", resume=out)
    assert not (tmp_path / "b").exists()


def test_corrupt_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CraftError, match="corrupt or truncated"):
        run(FinetuneConfig(**RUN), tmp_path / "o", resume=bad)
    with pytest.raises(CraftError, match="no checkpoint of a killed run there"):
        run(FinetuneConfig(**RUN), tmp_path / "o", resume=tmp_path / "nothing")
    assert not (tmp_path / "o").exists()
