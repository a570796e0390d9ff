"""The `baton` storage commands, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import paddle

import storage
from tests.conftest import assert_same, make_state, zeros_like

REPO = Path(__file__).resolve().parents[1]


def baton(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "baton_cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_publish_inspect_verify_from_a_paddle_save_file(tmp_path):
    state = make_state(21)
    src = tmp_path / "trainer.pdparams"
    paddle.save(state, str(src))
    root = str(tmp_path / "snap")
    out = baton("publish", str(src), "--to", root, "--version", "step-3", "--part-size", "4KiB")
    assert out.returncode == 0, out.stderr
    assert "published step-3 rank 0" in out.stdout
    target = zeros_like(state)
    storage.load_snapshot(root, "step-3", into=target)
    assert_same(target, state)

    out = baton("inspect", root, "--version", "step-3")
    assert out.returncode == 0 and "would load: level 1 (chunked parts)" in out.stdout and "complete" in out.stdout
    out = baton("verify", root, "--version", "step-3")
    assert out.returncode == 0 and "files verified" in out.stdout
    out = baton("verify", root, "--version", "step-3", "--sha256")  # none recorded: the audit says so, and fails
    assert out.returncode == 1 and "published without --sha256" in out.stdout
    out = baton("publish", str(src), "--to", root, "--version", "audited", "--part-size", "4KiB", "--sha256")
    assert out.returncode == 0, out.stderr
    out = baton("verify", root, "--version", "audited", "--sha256")
    assert out.returncode == 0 and "sha256" in out.stdout and "BAD" not in out.stdout

    part = Path(root) / "model_state.tp0.step-3.part1.pdparams"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    out = baton("verify", root, "--version", "step-3")
    assert out.returncode == 1 and "BAD" in out.stdout and "part1" in out.stdout


def test_publish_a_directory_of_rank_files(tmp_path):
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    states = [make_state(r) for r in range(2)]
    for r, s in enumerate(states):
        paddle.save(s, str(trainer / f"model_state.tp{r}.pdparams"))
    root = str(tmp_path / "snap")
    out = baton("publish", str(trainer), "--to", root, "--version", "v9")
    assert out.returncode == 0, out.stderr
    for r, s in enumerate(states):
        t = zeros_like(s)
        storage.load_snapshot(root, "v9", rank=r, into=t)
        assert_same(t, s)
    out = baton("versions", root)
    assert "v9" in out.stdout and "0,1" in out.stdout


def test_errors_are_one_clear_line(tmp_path):
    out = baton("inspect", str(tmp_path), "--version", "missing")
    assert out.returncode == 1 and "would load: nothing" in out.stdout
    out = baton("publish", str(tmp_path / "none.pdparams"), "--to", str(tmp_path), "--version", "../x")
    assert out.returncode == 2 and "invalid snapshot id" in out.stderr and "Traceback" not in out.stderr
    out = baton("publish", str(tmp_path / "none.pdparams"), "--to", str(tmp_path), "--id", "x")  # the old name, gone
    assert out.returncode == 2 and "--version" in out.stderr and "Traceback" not in out.stderr
    out = baton("publish", "--help")
    assert out.returncode == 0 and "--part-size" in out.stdout
