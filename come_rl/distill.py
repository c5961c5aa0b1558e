"""Progressive distillation (Salimans & Ho, 2022) of a diffusion expert: a student learns to take in one DDIM step what
its teacher takes in two, so a world model imagines with half the denoising steps; repeated, 8 -> 4 -> 2 -> 1.

The student is trained by ``come_rl.train`` (``distill_from=<teacher> distill_steps=N``) with everything training
has (resume, DDP, EMA, TensorBoard): for a clip, a grid level t = 1 - i / N (i uniform in 0 .. N - 1) and the
clip's noise give z_t = alpha_t x + sigma_t eps; the teacher takes two deterministic DDIM steps from z_t, to
t - 1 / (2N) and t - 1 / N, with the sampler's x0 clipping; the student's target is the clean frame x~ from which one
DDIM step lands where the teacher did (paper eq. 8):

    x~ = (z_end - (sigma_end / sigma_t) z_t) / (alpha_end - (sigma_end / sigma_t) alpha_t)     (x~ = z_end at t_end = 0)

and the student regresses x~ with its own training loss (``DiffusionExpert.loss(distill_target=...)``), so its
target (full / residual) and prediction (v / x0) are the teacher's. Rows trained in the unconditional mode are
distilled in that mode too: composition needs both (the contrastive baselines). Every expert of a world model is
distilled the same way; the composition rule is then applied at each of the student's steps by the sampler, as at
the teacher's; the long-term memory stays a copy of its (distilled) base memorized by that base's own loss.

``python -m come_rl.distill teacher=<checkpoint> student=<distilled expert dir> out=<dir>`` writes a world-model
checkpoint that imagines with the student (:func:`assemble_student`); a shortcut model (``come_rl.shortcut``) is
assembled the same way, with ``steps=N`` for its sampler.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from come_rl.checkpoint import load_expert
from come_rl.cli_args import parse_cli
from come_rl.diffusion.parametrization import _bcast, eps_to_x0
from come_rl.experts.expert import DiffusionExpert
from come_rl.io_utils import atomic_write_text


def grid_levels(t: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform draws t in [0, 1] -> the DDIM grid levels 1 - i / steps of the sampler (``linspace(1, 0, steps + 1)``),
    i = floor(t * steps) (uniform over the steps' starting levels)."""
    if bool((torch.as_tensor(steps) < 1).any()):
        raise ValueError(f"distillation needs a student of >= 1 steps, got {steps}")
    index = torch.minimum((t * steps).floor().clamp_min(0), torch.as_tensor(steps, dtype=t.dtype) - 1)
    return 1.0 - index / steps


def ddim_step(teacher: DiffusionExpert, prepared, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              clip_x0: float = 1.0, step: torch.Tensor | None = None) -> torch.Tensor:
    """One deterministic DDIM step of ``teacher`` from level t to level s (both (B,)), as ``come_rl.diffusion.sample``
    takes it (x0 clipped, eps re-derived from it); at s = 0 the clean estimate. ``step`` (B,): the step size a
    step-conditioned teacher is told (``come_rl.shortcut``); None: the plain denoiser."""
    alpha_t, sigma_t = teacher.schedule.alpha_sigma(t)
    if step is None and teacher.step_conditioned:
        step = torch.zeros_like(t)
    eps = teacher.predict_eps(prepared, z, t, step=step)
    x0 = eps_to_x0(eps, z, alpha_t, sigma_t)
    if clip_x0 > 0:
        x0 = x0.clamp(-clip_x0, clip_x0)
    eps = (z - _bcast(alpha_t, z) * x0) / _bcast(sigma_t, z)
    alpha_s, sigma_s = teacher.schedule.alpha_sigma(s)
    stepped = _bcast(alpha_s, z) * x0 + _bcast(sigma_s, z) * eps
    return torch.where(_bcast(s <= 0, z), x0, stepped)


@torch.no_grad()
def distillation_target(teacher: DiffusionExpert, frames: torch.Tensor, actions: torch.Tensor,
                        poses: torch.Tensor | None, t: torch.Tensor, eps: torch.Tensor, drop: torch.Tensor | None,
                        steps: int | torch.Tensor, clip_x0: float = 1.0,
                        teacher_step: torch.Tensor | None = None) -> torch.Tensor:
    """The frame-space target x~ (B, C, H, W) of a student of ``steps`` DDIM steps (an int, or one per row (B,)) for
    clips ``frames`` (B, K + 1, C, H, W) at grid levels ``t`` (B,) with noise ``eps``: what one student step from z_t
    must predict to land where two teacher steps land. ``drop``: rows in the unconditional mode (the teacher runs them
    unconditional too). ``teacher_step`` (B,): the step size a step-conditioned teacher is told for its half steps
    (``come_rl.shortcut``, where the teacher is the model itself)."""
    device = teacher.device
    frames, t, eps = frames.to(device), t.to(device).float(), eps.to(device).float()
    if isinstance(steps, torch.Tensor):
        steps = steps.to(device).float()
    if teacher_step is not None:
        teacher_step = teacher_step.to(device).float()
    prepared = teacher.prepare(frames[:, :-1], actions, poses, drop_context=drop)  # the context the loss gives
    alpha_t, sigma_t = teacher.schedule.alpha_sigma(t)
    z_t = _bcast(alpha_t, eps) * frames[:, -1].float() + _bcast(sigma_t, eps) * eps
    half, end = t - 0.5 / steps, (t - 1.0 / steps).clamp_min(0.0)
    z_mid = ddim_step(teacher, prepared, z_t, t, half, clip_x0, teacher_step)
    z_end = ddim_step(teacher, prepared, z_mid, half, end, clip_x0, teacher_step)
    alpha_end, sigma_end = teacher.schedule.alpha_sigma(end)
    ratio = sigma_end / sigma_t
    target = (z_end - _bcast(ratio, z_t) * z_t) / _bcast(alpha_end - ratio * alpha_t, z_t)
    return torch.where(_bcast(end <= 0, z_t), z_end, target)


def assemble_student(teacher: str | Path, student: str | Path, out: str | Path, role: str = "base",
                     steps: int = 0) -> Path:
    """A world-model checkpoint that imagines with a few-step expert: a copy of the ``teacher`` checkpoint directory
    (every expert, odometry head, ``world_model.json``) whose ``role`` expert is the one trained in ``student``: a
    distilled student (``come_rl.train distill_from=...``; ``sampler.steps`` becomes the student's) or a shortcut model
    (``come_rl.train shortcut_fraction=...``, ``come_rl.shortcut``; ``sampler.steps`` becomes ``steps``, or stays the
    teacher's with 0). Refused (nothing written) when the student is neither, or its frame size, action space or
    network differ from the teacher's expert."""
    teacher, student, out = Path(teacher), Path(student), Path(out)
    load_expert(student, role)  # present, readable, its weights' checksum right
    _, teacher_spec = load_expert(teacher, role)
    student_spec = json.loads((student / f"{role}.json").read_text())
    record, shortcut = student_spec.get("distillation"), student_spec.get("shortcut")
    if not (record or shortcut):
        raise ValueError(f"{student / (role + '.json')} records no distillation or shortcut training; train the student "
                         f"with `python -m come_rl.train distill_from=<teacher> distill_steps=N out={student}` or "
                         f"`python -m come_rl.train init_from=<teacher>/{role} shortcut_fraction=0.5 out={student}`")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 1 (the sampler's steps), or 0 to keep the checkpoint's; "
                         f"got {steps!r}")
    if record and steps and steps != int(record["student_steps"]):
        raise ValueError(f"the student in {student} was distilled for {record['student_steps']} steps, not {steps}; "
                         f"leave steps=0")

    def network(spec: dict) -> dict | None:  # the step input is what a shortcut model adds
        kwargs = spec.get("backbone_kwargs")
        return None if kwargs is None else {k: v for k, v in kwargs.items() if k != "step_conditioned"}

    for what, mine, theirs in (("frame size", student_spec.get("frame_size"), teacher_spec.get("frame_size")),
                               ("action space", student_spec.get("action_spec"), teacher_spec.get("action_spec")),
                               ("network", network(student_spec), network(teacher_spec))):
        if mine != theirs:
            origin = record.get("teacher") if record else student_spec.get("train_config", {}).get("init_from")
            raise ValueError(f"the student in {student} has {what} {mine!r} but the teacher checkpoint {teacher} has "
                             f"{theirs!r}; assemble it with the checkpoint it was trained from ({origin})")
    if out.resolve() == teacher.resolve():
        raise ValueError(f"out={out} is the teacher checkpoint; write the student's checkpoint elsewhere")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as scratch:
        staged = Path(scratch) / "checkpoint"
        shutil.copytree(teacher, staged, ignore=shutil.ignore_patterns("*.tmp", "*_train_state.pt", "tensorboard"))
        for suffix in (".safetensors", ".json"):
            shutil.copy2(student / f"{role}{suffix}", staged / f"{role}{suffix}")
        settings_path = staged / "world_model.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        sampler_steps = int(record["student_steps"]) if record else steps
        if sampler_steps:
            settings["sampler"] = dict(settings.get("sampler") or {}, steps=sampler_steps)
        key = "distillation" if record else "shortcut"
        settings[key] = dict(record or shortcut, student=str(student), role=role)
        atomic_write_text(settings_path, json.dumps(settings, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(out))
    return out


@dataclass
class AssembleConfig:
    """``python -m come_rl.distill teacher=<checkpoint> student=<distilled or shortcut expert dir> out=<new checkpoint>
    [steps=N]``."""

    teacher: str = ""
    student: str = ""
    out: str = ""
    role: str = "base"
    steps: int = 0
    """a shortcut student's sampler steps (0: the teacher checkpoint's); a distilled student samples with its own."""


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, AssembleConfig,
                       "python -m come_rl.distill teacher=<checkpoint> student=<distilled expert dir> out=<dir>")
    if not (config.teacher and config.student and config.out):
        raise SystemExit("give teacher=<checkpoint dir> student=<distilled expert dir> out=<new checkpoint dir>")
    out = assemble_student(config.teacher, config.student, config.out, config.role, config.steps)
    steps = json.loads((out / "world_model.json").read_text()).get("sampler", {}).get("steps")
    print(f"wrote {out}: the teacher's checkpoint with the student {config.role} expert, sampling with {steps} steps")


if __name__ == "__main__":
    main()
