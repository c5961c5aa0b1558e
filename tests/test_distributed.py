"""Distributed training: 2 CPU processes (gloo) train the weights one process trains on the same global batch.

The ranks get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
``torch.multiprocessing`` here, and from ``python -m torch.distributed.run`` itself in the command-line test.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from come_rl.train import (
    DistributedContext,
    TrainConfig,
    build_expert,
    micro_batch_size,
    parse_overrides,
    shard_rows,
    train_expert,
    training_device,
)

TINY = '{"widths": [16, 32, 32], "cond_dim": 32}'
ROOT = Path(__file__).resolve().parents[1]


def _args(out: Path, *extra: str) -> list[str]:
    return ["model=unet_cards", f"out={out}", "threads=1", "online_episodes=16", "log_every=1", "device=cpu",
            f"backbone_overrides={TINY}", *extra]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, args: list[str], result_dir: str) -> None:
    """One rank, started by torch.multiprocessing with the environment torchrun gives its ranks."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    result = train_expert(parse_overrides(args))
    assert result.context == DistributedContext(rank=rank, local_rank=rank, world_size=world_size)
    weights = {name: tensor.detach().cpu() for name, tensor in result.expert.backbone.state_dict().items()}
    torch.save({"weights": weights, "step": result.step}, Path(result_dir) / f"rank{rank}.pt")


def _logged_losses(out: Path) -> list[float]:
    with open(out / "train_log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[name].double() - b[name].double()).abs().max().item() for name in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_two_gloo_ranks_train_what_one_process_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    # global batch 8 = 2 clips per micro-batch x 2 ranks x 2 accumulation steps, 3 optimizer steps
    common = ["batch_size=8", "steps=3"]
    mp.spawn(_rank_worker, args=(2, _free_port(), _args(tmp_path / "ddp", *common, "grad_accum_steps=2"),
                                 str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    # (a) DDP averaged the gradients: both ranks hold the same weights, bit for bit
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name
    single = train_expert(parse_overrides(_args(tmp_path / "single", *common)))
    assert single.context.world_size == 1 and single.step == 3
    expected = {name: tensor.detach() for name, tensor in single.expert.backbone.state_dict().items()}
    # the weights moved from their seeded start (the comparisons below would hold for two untrained models too)
    torch.manual_seed(0)
    initial = build_expert(parse_overrides(_args(tmp_path / "unused")), action_dim=5, frame_size=48)[0]
    moved = [name for name, tensor in initial.backbone.state_dict().items() if not torch.equal(tensor, expected[name])]
    assert len(moved) > len(expected) // 2
    # (b) ... and the weights and losses of one process on the same global batch, to float rounding
    _assert_close(ranks[0]["weights"], expected, atol=1e-5)
    ddp_losses, single_losses = _logged_losses(tmp_path / "ddp"), _logged_losses(tmp_path / "single")
    assert len(ddp_losses) == len(single_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)
    # only rank 0 wrote the checkpoint, the log and the rollout GIF, each once
    assert (tmp_path / "ddp" / "base.safetensors").is_file() and not list((tmp_path / "ddp").glob("*.tmp"))
    trained = torch.load(tmp_path / "ddp" / "base_train_state.pt", weights_only=False)
    _assert_close(trained["model"], ranks[0]["weights"], atol=0.0)
    assert trained["spec"]["distributed"] == {"world_size": 2, "grad_accum_steps": 2, "micro_batch": 2,
                                              "device": "cpu", "precision": "fp32"}


def test_torchrun_trains_and_a_single_process_resumes_its_checkpoint(tmp_path: Path) -> None:
    """The command of the README, then a resume with another world size: the global batch does not change with it."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "come_rl.train", *_args(out, "batch_size=4", "steps=2")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "effective batch 4 = 2 clips per micro-batch x 2 rank(s) x 1 accumulation step(s)" in result.stdout
    assert result.stdout.count("saved ") == 1, "only rank 0 saves and logs"
    # a kill after step 2, resumed by one process for a third step, ends where an uninterrupted single process ends
    resumed = train_expert(parse_overrides(_args(out, "batch_size=4", "steps=3")))
    straight = train_expert(parse_overrides(_args(tmp_path / "straight", "batch_size=4", "steps=3")))
    _assert_close(resumed.expert.backbone.state_dict(), straight.expert.backbone.state_dict(), atol=1e-5)
    assert _logged_losses(out) == pytest.approx(_logged_losses(tmp_path / "straight"), abs=1e-5)


def test_batches_split_evenly_over_ranks_and_micro_batches() -> None:
    config = TrainConfig(batch_size=12, grad_accum_steps=3)
    assert micro_batch_size(config, 2) == 2
    rows = [shard_rows(m, DistributedContext(rank=r, world_size=2), 2) for m in range(3) for r in range(2)]
    assert [(s.start, s.stop) for s in rows] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by world size 5 x grad_accum_steps 3 = 15"):
        micro_batch_size(config, 5)
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
        micro_batch_size(TrainConfig(grad_accum_steps=0), 1)


def test_bad_devices_are_refused_with_the_fix(tmp_path: Path) -> None:
    from come_rl import devices

    two_ranks = DistributedContext(rank=1, local_rank=1, world_size=2)
    assert training_device("cpu", two_ranks) == torch.device("cpu")
    with pytest.raises(ValueError, match="every rank trains on cuda:LOCAL_RANK; pass device=cuda"):
        training_device("cuda:1", two_ranks)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        training_device("gpu", DistributedContext())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but torch.cuda.is_available\(\) is False; use device=cpu "
                                             r"or auto"):
            train_expert(parse_overrides(_args(tmp_path, "device=cuda", "steps=1")))
        if not devices.cpu_supports_bf16():
            with pytest.raises(ValueError, match="precision=bf16 on the CPU needs oneDNN bfloat16 kernels"):
                train_expert(parse_overrides(_args(tmp_path, "precision=bf16", "steps=1")))


def _stalling_rank(rank: int, port: int, args: list[str], result_dir: str) -> None:
    """A rank of a 2-rank run; rank 1 stalls in its second step (a hung GPU, a node cut off: alive, silent)."""
    import come_rl.train as train_module

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if rank == 1:
        step_once = train_module.training_step

        def stall_at_step_1(*call_args):
            if call_args[-1] == 1:
                import time

                time.sleep(3600)
            return step_once(*call_args)

        train_module.training_step = stall_at_step_1
    try:
        train_expert(parse_overrides(args))
    except RuntimeError as error:
        (Path(result_dir) / f"rank{rank}.error").write_text(str(error))
        raise SystemExit(3) from error


def test_a_stalled_rank_makes_the_others_fail_with_a_resume_hint_not_hang(tmp_path: Path) -> None:
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    args = _args(tmp_path / "ddp", "batch_size=4", "steps=4", "dist_timeout_s=3")
    port = _free_port()
    ranks = [context.Process(target=_stalling_rank, args=(rank, port, args, str(tmp_path))) for rank in (0, 1)]
    for process in ranks:
        process.start()
    start = time.monotonic()
    ranks[0].join(timeout=240)
    try:
        assert ranks[0].exitcode == 3, f"rank 0 did not fail on its own (exit code {ranks[0].exitcode})"
        message = (tmp_path / "rank0.error").read_text()
        assert "rank 0: a collective with the other ranks failed or waited more than dist_timeout_s=3 s" in message
        assert "run the same command again to resume from there" in message
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
            process.join()
    assert time.monotonic() - start < 240
    with pytest.raises(ValueError, match="dist_timeout_s must be > 0"):
        train_expert(parse_overrides(_args(tmp_path / "x", "dist_timeout_s=0")))
