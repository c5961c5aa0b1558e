"""Devices: one code path for CPU and GPU, proved on the CPU.

No GPU is needed here: the device strings and their errors, a recorder that fails when come_rl creates a tensor without
saying where (imagine, memorize and a training step: every factory call inside come_rl names its device, so on a GPU
every tensor of a step is where the model is), torch.compile's plumbing (eager backend) and the CPU results of the
``device=`` options. The tests at the end run only where CUDA is present.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from come_rl import devices
from come_rl.diffusion import SamplerConfig
from come_rl.experts.long_term import MemorizeConfig
from come_rl.world_model import CompositionConfig, WorldModel
from envs.memory_cards import INVERSE_ACTIONS, MemoryCardsEnv, cursor_pose_model
from test_world_model import filled_world_model, observe_random_walk, one_hot_actions, tiny_expert, tiny_stm_and_sltm

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.randn, torch.rand,
             torch.randint, torch.randperm, torch.eye, torch.tensor, torch.as_tensor, torch.zeros_like}
FOLLOW_INPUT = {torch.zeros_like, torch.as_tensor, torch.tensor}  # device of a tensor argument when given one


class DevicelessFactoryRecorder(TorchFunctionMode):
    """Records every tensor factory that come_rl's own code calls without ``device=`` (the CPU default, which on a
    GPU would put that tensor on the wrong device)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        follows_input = func in FOLLOW_INPUT and args and isinstance(args[0], torch.Tensor)
        if func in FACTORIES and "device" not in kwargs and not follows_input:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "/come_rl/" in frame.f_code.co_filename:
                self.calls.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **kwargs)


def four_expert_model(**memorize) -> WorldModel:
    stm, sltm = tiny_stm_and_sltm()
    env = MemoryCardsEnv()
    wm = WorldModel(tiny_expert(), env.action_spec, 48, stm=stm, sltm=sltm,
                    composition=CompositionConfig(experts=["base", "ltm", "stm", "sltm"], sltm_memorizes=True),
                    sampler=SamplerConfig(steps=2, eta=0.5, langevin_steps=1),
                    memorize_config=MemorizeConfig(steps=2, batch_size=8, **memorize), pose_model=cursor_pose_model,
                    device="cpu")
    return observe_random_walk(wm, 16)


def test_device_strings_resolve_or_fail_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    assert devices.resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert devices.resolve_device(None) == devices.resolve_device("auto")
    for bad in ("gpu", "cuda:x", "cuda0", "", "tpu"):
        with pytest.raises(ValueError, match="unknown device .*use one of auto, cpu, cuda, cuda:N"):
            devices.resolve_device(bad)
    if not CUDA:
        for text in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ValueError, match=rf"device='{text}' but torch.cuda.is_available\(\) is False; use "
                                                 r"device=cpu or auto"):
                devices.resolve_device(text)
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            devices.resolve_device(f"cuda:{torch.cuda.device_count()}")
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == "fp32" and devices.resolve_precision("FP32", cpu) == "fp32"
    if devices.cpu_supports_bf16():
        assert devices.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match="precision=bf16 on the CPU needs oneDNN bfloat16 kernels .* use precision=fp32 "
                                         "or auto"):
        devices.resolve_precision("bf16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        devices.resolve_precision("fp16", cpu)
    assert isinstance(devices.autocast(cpu, "fp32"), type(devices.autocast(cpu, "fp32")))


def test_the_recorder_sees_a_factory_without_a_device() -> None:
    """The check below can fail: a come_rl file that calls torch.zeros(3) is caught, one that names the device not."""
    namespace = {"torch": torch}
    code = "def bad():\n    return torch.zeros(3)\ndef good():\n    return torch.zeros(3, device='cpu')\n"
    exec(compile(code, "/somewhere/come_rl/fake.py", "exec"), namespace)
    with DevicelessFactoryRecorder() as recorder:
        namespace["good"]()
    assert recorder.calls == []
    with DevicelessFactoryRecorder() as recorder:
        namespace["bad"]()
    assert recorder.calls == ["zeros at /somewhere/come_rl/fake.py:2"]


def test_imagine_memorize_and_training_create_every_tensor_on_a_named_device(tmp_path) -> None:
    from come_rl.train import DistributedContext, TrainConfig, build_expert, draw_training_noise, training_step

    wm = four_expert_model(reverse_fraction=0.25, inverse_actions=list(INVERSE_ACTIONS), revisit_fraction=0.25,
                           short_context_fraction=0.25, change_weighting=0.5, uniform_fraction=0.5)
    actions = one_hot_actions(2, 2)
    with DevicelessFactoryRecorder() as recorder:
        stats = wm.memorize(steps=2, generator=torch.Generator().manual_seed(0))
        frames = wm.imagine(actions, seed=1)
        history = (torch.zeros(2, 8, 3, 48, 48), torch.zeros(2, 8, 5), torch.zeros(2, 8, 3))
        wm.imagine(actions, seed=1, history=history)
    assert stats["steps"] == 2 and stats["sltm"]["steps"] == 2
    assert frames.shape == (2, 2, 3, 48, 48) and frames.device.type == "cpu"
    config = TrainConfig(model="unet_cards", batch_size=4, grad_accum_steps=2,
                         backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32})
    expert = build_expert(config, 5, 48)[0]
    optimizer = torch.optim.AdamW(expert.backbone.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.rand(4, 4, 3, 48, 48) * 2 - 1, torch.eye(5)[torch.randint(0, 5, (4, 4))], None)
    with DevicelessFactoryRecorder() as train_recorder:
        noise = draw_training_noise(4, (3, 48, 48), 0.1, generator)
        loss = training_step(expert, expert.backbone, optimizer, batch, noise, config, DistributedContext(), 2,
                             torch.device("cpu"), "fp32", step=0)
    assert np.isfinite(loss)
    assert recorder.calls + train_recorder.calls == [], "\n".join(recorder.calls + train_recorder.calls)


def test_world_model_devices_precision_and_outputs(tmp_path) -> None:
    from come_rl.checkpoint import save_expert

    expert = tiny_expert()
    save_expert(tmp_path, expert, expert.spec)
    wm = WorldModel.load(tmp_path, experts=["base", "ltm"], sampler={"steps": 2}, device="cpu")
    assert wm.device == torch.device("cpu") and wm.precision == "fp32" and wm.ltm.device == wm.device
    assert WorldModel.load(tmp_path, experts=["base"], device="auto").device == devices.resolve_device("auto")
    if not CUDA:  # a bad device fails before the checkpoint is read (the directory does not even exist)
        with pytest.raises(ValueError, match="use device=cpu or auto"):
            WorldModel.load(tmp_path / "missing", device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        WorldModel.load(tmp_path, device="gpu0")
    # experts on two devices are refused (meta stands in for a second device)
    meta = tiny_expert().to("meta")
    with pytest.raises(ValueError, match="different devices"):
        WorldModel(tiny_expert(), wm.action_spec, 48, stm=meta, composition=CompositionConfig(experts=["base"]))
    # inputs on any device, frames returned on the CPU; float tensor frames are kept on the CPU in the memory
    wm.reset()
    wm.observe(torch.zeros(3, 48, 48))
    wm.observe(torch.zeros(3, 48, 48), torch.eye(5)[1])
    assert wm.memory.frames.device.type == "cpu"
    assert wm.imagine(one_hot_actions(2, 1)).device.type == "cpu"


@pytest.mark.skipif(not devices.cpu_supports_bf16(), reason="this CPU has no oneDNN bfloat16 kernels")
def test_bf16_on_a_cpu_with_bfloat16_kernels_imagines_close_to_fp32(tmp_path) -> None:
    """precision=bf16 on the CPU (opt-in) really runs the networks in bfloat16: frames differ from fp32 by bf16's
    rounding, not by a different sample; the fp32 default stays exact."""
    from come_rl.checkpoint import save_expert

    expert = tiny_expert()
    save_expert(tmp_path, expert, expert.spec)
    frames = {}
    for precision in ("fp32", "bf16"):
        wm = WorldModel.load(tmp_path, experts=["base"], sampler={"steps": 3}, device="cpu", precision=precision)
        assert wm.precision == precision
        observe_random_walk(wm, 4, seed=1)
        frames[precision] = wm.imagine(one_hot_actions(4, 2), seed=3)
    difference = (frames["bf16"] - frames["fp32"]).abs()
    assert torch.isfinite(frames["bf16"]).all()
    assert 0.0 < difference.mean() < 0.02, f"bf16 vs fp32 mean |diff| {difference.mean():.4g}"


def test_compile_runs_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True routes denoising through torch.compile (the eager backend here: no C compiler, same numbers)."""
    monkeypatch.setattr(devices, "COMPILE_BACKEND", "eager")
    plain = filled_world_model()
    compiled = filled_world_model()
    compiled.compile = True
    for expert in (compiled.base, compiled.ltm):
        expert.compiled = True
    calls = []
    original = devices.compiled_function
    monkeypatch.setattr(devices, "compiled_function", lambda fn, backend: calls.append(backend) or original(fn, backend))
    actions = one_hot_actions(2, 2)
    assert torch.allclose(compiled.imagine(actions, seed=3), plain.imagine(actions, seed=3), atol=1e-6)
    assert calls and set(calls) == {"eager"}


def test_cpu_convolutions_run_channels_last_with_the_same_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the world model keeps its convolution weights channels-last (the LTM's copies too): its frames equal
    those of the weights as built, up to float rounding; switched off, nothing is converted."""
    def convs_channels_last(module: torch.nn.Module) -> list[bool]:
        return [p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]

    fast = filled_world_model()
    monkeypatch.setattr(devices, "CHANNELS_LAST_ON_CPU", False)
    plain = filled_world_model()
    assert convs_channels_last(fast.base) and all(convs_channels_last(fast.base))
    assert not any(convs_channels_last(plain.base))
    actions = one_hot_actions(3, 3)
    frames_fast, frames_plain = fast.imagine(actions, seed=5), plain.imagine(actions, seed=5)
    difference = (frames_fast - frames_plain).abs().max()
    assert difference < 1e-4, f"channels-last frames differ from the plain layout's by {difference:.3g}"
    assert not torch.equal(frames_fast, fast.imagine(actions, seed=6))  # the comparison can fail: seeds matter
    # Memorization trains in that layout too (Adam's first steps are not bit-stable across layouts: compare shapes of
    # the result, not digits), and the LTM's merged copy for sampling keeps it.
    fast.memorize(steps=2)
    assert all(convs_channels_last(fast.ltm.inference_backbone()))
    assert torch.isfinite(fast.imagine(actions, seed=5)).all()
    same = devices.prefer_channels_last(torch.nn.Linear(3, 3))
    assert same.weight.is_contiguous()
    for text, value in (("0", False), ("off", False), ("1", True), ("TRUE", True), ("", True)):
        monkeypatch.setenv("COME_RL_CHANNELS_LAST", text)
        assert devices._flag("COME_RL_CHANNELS_LAST", True) is value
    monkeypatch.setenv("COME_RL_CHANNELS_LAST", "maybe")
    with pytest.raises(ValueError, match="COME_RL_CHANNELS_LAST='maybe' is not a boolean; set it to 1 or 0"):
        devices._flag("COME_RL_CHANNELS_LAST", True)


def test_training_with_compile_true_takes_a_step(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from come_rl.train import parse_overrides, train_expert

    monkeypatch.setattr(devices, "COMPILE_BACKEND", "eager")
    args = ["model=unet_cards", "threads=1", "batch_size=2", "online_episodes=4", "steps=1", "device=cpu",
            'backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32}', "log_every=1"]
    compiled = train_expert(parse_overrides([*args, f"out={tmp_path / 'c'}", "compile=true"]))
    assert compiled.expert.backbone._compiled_call_impl is not None  # nn.Module.compile's in-place wrapper
    plain = train_expert(parse_overrides([*args, f"out={tmp_path / 'p'}"]))
    assert plain.expert.backbone._compiled_call_impl is None
    for name, tensor in plain.expert.backbone.state_dict().items():
        assert torch.allclose(compiled.expert.backbone.state_dict()[name], tensor, atol=1e-6), name


def test_lpips_takes_a_device_and_answers_on_the_cpu() -> None:
    from come_rl.metrics.lpips_metric import get_lpips

    with pytest.raises(ValueError, match="unknown device"):
        get_lpips(device="gpu")
    metric = get_lpips(device="cpu")
    assert get_lpips(device="auto") is get_lpips(device=devices.resolve_device("auto"))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    distances = metric(images, images.flip(0))
    assert distances.shape == (2,) and distances.device.type == "cpu"


# ------------------------------------------------------------------------------------------------ CUDA only
@needs_cuda
def test_cuda_imagine_and_memorize_match_the_cpu_in_fp32() -> None:
    cpu = filled_world_model()
    gpu = filled_world_model()
    gpu_model = WorldModel(gpu.base, gpu.action_spec, 48, composition=gpu.composition, sampler=gpu.sampler,
                           memorize_config=gpu.memorize_config, device="cuda", precision="fp32")
    gpu_model.memory = gpu.memory
    assert gpu_model.base.device.type == "cuda" and gpu_model.ltm.device.type == "cuda"
    actions = one_hot_actions(4, 2)
    a, b = cpu.imagine(actions, seed=5), gpu_model.imagine(actions, seed=5)
    assert b.device.type == "cpu" and (a - b).abs().max() < 1e-3
    stats = gpu_model.memorize(steps=2, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(stats["loss_last"])
    bf16 = WorldModel(gpu.base, gpu.action_spec, 48, composition=gpu.composition, sampler=gpu.sampler,
                      device="cuda", precision="auto")
    bf16.memory = gpu.memory
    assert bf16.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.isfinite(bf16.imagine(actions, seed=5)).all()


@needs_cuda
def test_cuda_training_writes_a_checkpoint_the_cpu_loads(tmp_path) -> None:
    from come_rl.train import parse_overrides, train_expert

    args = ["model=unet_cards", f"out={tmp_path}", "threads=1", "batch_size=4", "online_episodes=4", "steps=2",
            "device=cuda", 'backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32}']
    result = train_expert(parse_overrides(args))
    assert result.expert.device.type == "cuda"
    wm = WorldModel.load(tmp_path, experts=["base"], device="cpu")
    assert wm.device.type == "cpu"
    assert train_expert(parse_overrides([*args[:-2], "steps=3", "device=cpu", args[-1]])).step == 3  # resumes on CPU


def test_thread_counts_resolve_and_auto_takes_the_idle_cores(monkeypatch):
    """run.threads: a count stays; auto = the cores idle now (finding 7: threads beyond them oversubscribe the cores;
    measured by python -m come_rl.bench threads), at least 1 and at most the cores; bad values name the fix."""
    import os

    from come_rl import devices

    assert devices.resolve_threads(3) == 3 and devices.resolve_threads("2") == 2
    cores = os.cpu_count()
    monkeypatch.setattr(devices, "idle_cores", lambda interval=0.25: 0.4)  # another process holds every core
    assert devices.resolve_threads("auto") == 1
    monkeypatch.setattr(devices, "idle_cores", lambda interval=0.25: cores - 0.8)  # one core busy
    assert devices.resolve_threads("auto") == max(1, cores - 1)
    monkeypatch.setattr(devices, "idle_cores", lambda interval=0.25: cores + 3.0)
    assert devices.resolve_threads("AUTO") == cores
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="threads must be a count >= 1 or auto"):
            devices.resolve_threads(bad)
    monkeypatch.undo()
    assert 0.0 <= devices.idle_cores(0.05) <= cores + 1e-6  # the real measurement, from /proc/stat


def test_the_planning_run_defaults_to_one_thread_and_resolves_auto(tmp_path, monkeypatch):
    """The default run.threads is 1 (it measured well on a busy 2-core machine); run.threads=auto is resolved once,
    before any work, and the run plays with that count."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import come_rl.run
    from come_rl import devices

    with initialize_config_dir(config_dir=str(Path(come_rl.run.__file__).parent / "conf"), version_base="1.3"):
        assert compose(config_name="config", overrides=["run.name=x"]).run.threads == 1
        cfg = compose(config_name="config", overrides=["run.name=x", "run.threads=auto", "env=point_mass",
                                                       "model=point_mass", "agent=mppi", "run.episodes=1",
                                                       f"run.out_dir={tmp_path}", "run.progress=false",
                                                       "run.lpips_metric=false", "run.gif_episodes=0"])
    monkeypatch.setattr(devices, "idle_cores", lambda interval=0.25: 1.0)
    monkeypatch.setattr(come_rl.run, "resolve_threads", devices.resolve_threads)
    seen = []
    monkeypatch.setattr(come_rl.run.torch, "set_num_threads", lambda n: seen.append(n))
    come_rl.run.run(cfg)
    assert seen and set(seen) == {1} and cfg.run.threads == 1


def test_a_checkpoint_declares_what_auto_means_on_the_cpu(tmp_path) -> None:
    """precision=auto on the CPU is the checkpoint's ``cpu_precision`` (world_model.json) where the CPU has bfloat16
    kernels, fp32 elsewhere; it survives save / load; an explicit precision wins; a bad declaration is refused."""
    import json

    from come_rl.checkpoint import precision_for, save_expert

    cpu = torch.device("cpu")
    bf16_here = "bf16" if devices.cpu_supports_bf16() else "fp32"
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("auto", cpu, cpu_auto="bf16") == bf16_here
    assert devices.resolve_precision("fp32", cpu, cpu_auto="bf16") == "fp32"
    with pytest.raises(ValueError, match="cpu_precision must be fp32 or bf16"):
        devices.resolve_precision("auto", cpu, cpu_auto="fp16")
    expert = tiny_expert()
    save_expert(tmp_path, expert, expert.spec)
    assert WorldModel.load(tmp_path, experts=["base"], device="cpu").precision == "fp32"  # no declaration: fp32
    (tmp_path / "world_model.json").write_text(json.dumps({"cpu_precision": "bf16"}))
    wm = WorldModel.load(tmp_path, experts=["base"], device="cpu")
    assert wm.precision == bf16_here == precision_for(tmp_path, "auto", "cpu")
    assert WorldModel.load(tmp_path, experts=["base"], device="cpu", precision="fp32").precision == "fp32"
    wm.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "world_model.json").read_text())["cpu_precision"] == "bf16"
    # the shipped checkpoints: both validated in bf16 on the CPU (results/few_step: Memory Cards since session 25,
    # the maze's first command since session 26)
    assert precision_for("memory_cards", "auto", "cpu") == bf16_here
    assert precision_for("memory_maze", "auto", "cpu") == bf16_here
    assert precision_for("memory_maze", "fp32", "cpu") == "fp32"
