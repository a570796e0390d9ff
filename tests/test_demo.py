"""The README's main job, run as a user runs it (on the tiny model to keep CI short)."""

import subprocess
import sys


def test_baton_demo_runs_the_pipeline_and_stops_what_it_started(tmp_path):
    run = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "baton_cli", "demo", "--model", "tiny", "--dir", str(run)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("[5/5]", "live step_1", "live step_2", "completion from weight_version=step_2"):
        assert expected in out.stdout, out.stdout
    assert {p.name for p in (run / "snapshots").glob("*.manifest.json")} == {
        "model_state.tp0.step_1.manifest.json", "model_state.tp0.step_2.manifest.json"}
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run / "snapshots") not in processes  # the inference server it started is gone
