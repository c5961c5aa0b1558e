"""python -m come_rl.gpu_check: what runs here without a GPU (the plan it writes, its argument checks)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from come_rl.gpu_check import GPUCheckConfig, main, run_check

ROOT = Path(__file__).resolve().parents[1]


def test_a_dry_run_writes_the_plan_of_every_step(tmp_path):
    report = run_check(GPUCheckConfig(out_dir=str(tmp_path), dry_run=True, train_minutes=1.5))
    folder = tmp_path / "dry_run"
    saved = json.loads((folder / "gpu_check.json").read_text())
    assert saved == json.loads(json.dumps(report))
    steps = {row["step"]: row for row in saved["steps"]}
    assert list(steps) == ["cuda_tests", "bench_fp32", "bench_bf16", "torchrun_train", "distill", "shortcut"]
    assert all(row["status"] == "planned" for row in steps.values())
    assert "tests/test_devices.py -k cuda" in steps["cuda_tests"]["command"]
    assert "device=cuda precision=bf16" in steps["bench_bf16"]["command"]
    assert "--nproc_per_node=1 -m come_rl.train" in steps["torchrun_train"]["command"]
    assert "minutes=1.5" in steps["torchrun_train"]["command"]
    assert f"out={folder / 'train'}" in steps["torchrun_train"]["command"]
    table = (folder / "gpu_check.md").read_text()
    assert "distill_steps=4" in steps["distill"]["command"] and f"out={folder / 'distill'}" in steps["distill"]["command"]
    assert "shortcut_fraction=0.5" in steps["shortcut"]["command"] and "minutes=0.75" in steps["shortcut"]["command"]
    from come_rl.train import parse_overrides

    for name in ("distill", "shortcut"):  # every key of the two training rounds is a TrainConfig key
        parse_overrides(steps[name]["command"].split("-m come_rl.train ")[1].split())
    assert table.startswith("# GPU check: dry-run") and table.count("| planned |") == 6
    # every step's command parses: the benchmark and training accept their keys (--help lists them, exits 0)
    for name in ("bench_fp32", "torchrun_train"):
        module = "come_rl.bench" if name.startswith("bench") else "come_rl.train"
        extra = ["world_model"] if module == "come_rl.bench" else []
        done = subprocess.run([sys.executable, "-m", module, *extra, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-1000:]
        for key in ("device", "precision", "out_dir" if name.startswith("bench") else "out"):
            assert key in done.stdout, (module, key)


@pytest.mark.parametrize("argv, message", [(["device=cpu"], "device must be cuda or cuda:N"),
                                            (["train_minutes=0"], "train_minutes must be > 0"),
                                            (["step_timeout_s=1"], "step_timeout_s must be >= 10"),
                                            (["minutes=3"], "minutes")])
def test_bad_settings_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_says_so_and_how_to_plan_only(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device.*dry_run=true"):
        main([f"out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())
