"""Save and load experts: weights in safetensors, the recipe that rebuilds them in JSON beside them.

A checkpoint directory holds ``<name>.safetensors`` + ``<name>.json``. The JSON says which backbone to build and how
(``backbone``, ``backbone_kwargs``), the schedule, the expert's role and the action space, so a checkpoint is
self-describing and a mismatch (a base checkpoint loaded as an STM, a wrong action space) is caught with a clear error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from come_rl.diffusion import build_schedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.backbone import VideoBackbone
from come_rl.nets.unet import UNetConfig, VideoUNet

FORMAT_VERSION = 1


def build_backbone_from_spec(name: str, kwargs: dict[str, Any]) -> VideoBackbone:
    """Build a backbone by registry name: "unet" here, transformer backbones from ``come_rl.nets.registry``."""
    if name == "unet":
        return VideoUNet(UNetConfig(**kwargs))
    try:
        from come_rl.nets.registry import build_backbone
    except ImportError as error:  # pragma: no cover - registry ships with the package
        raise ValueError(f"unknown backbone {name!r} and no transformer registry available") from error
    return build_backbone(name, **kwargs)


def expert_spec(expert: DiffusionExpert, backbone_name: str, backbone_kwargs: dict, extra: dict | None = None) -> dict:
    spec = {
        "format_version": FORMAT_VERSION,
        "role": expert.name,
        "backbone": backbone_name,
        "backbone_kwargs": backbone_kwargs,
        "schedule": type(expert.schedule).__name__.replace("Schedule", "").lower(),
        "uses_poses": expert.uses_poses,
        "target": expert.target,
    }
    spec.update(extra or {})
    return spec


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_expert(directory: str | Path, expert: DiffusionExpert, spec: dict, state_dict: dict | None = None,
                half: bool = False) -> Path:
    """Write ``<directory>/<role>.safetensors`` and ``.json`` atomically; ``state_dict`` overrides the weights (EMA)."""
    directory = Path(directory)
    state = state_dict if state_dict is not None else expert.backbone.state_dict()
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    role = spec["role"]
    _atomic(directory / f"{role}.safetensors", lambda tmp: save_file(tensors, tmp))
    _atomic(directory / f"{role}.json", lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=2)))
    return directory / f"{role}.safetensors"


def load_expert(directory: str | Path, role: str = "base", expect: dict | None = None) -> tuple[DiffusionExpert, dict]:
    """Load the expert ``role`` from a checkpoint directory. ``expect`` lists spec entries that must match."""
    directory = Path(directory)
    weights, recipe = directory / f"{role}.safetensors", directory / f"{role}.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist; train one with "
                                f"`python -m come_rl.train ...` or pass the right model.checkpoint path")
    for path in (weights, recipe):
        if not path.is_file():
            present = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(f"checkpoint {directory} has no {path.name} (files there: {present}); "
                                    f"is the expert role {role!r} right?")
    try:
        spec = json.loads(recipe.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{recipe} is not valid JSON ({error}); the checkpoint is corrupt, retrain or re-copy it") from error
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{recipe} has format_version {spec.get('format_version')}, this come_rl reads {FORMAT_VERSION}")
    for key, value in (expect or {}).items():
        if spec.get(key) != value:
            raise ValueError(f"checkpoint {recipe} has {key}={spec.get(key)!r} but {value!r} was requested; "
                             f"pick a checkpoint trained for it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {weights} ({error}); the file is corrupt or truncated, retrain or re-copy it") from error
    backbone = build_backbone_from_spec(spec["backbone"], spec["backbone_kwargs"])
    reference = backbone.state_dict()
    missing, unexpected = set(reference) - set(state), set(state) - set(reference)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its recipe {recipe.name}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    backbone.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    # Checkpoints written before targets were recorded all predict the residual.
    expert = DiffusionExpert(backbone, build_schedule(spec["schedule"]), name=spec["role"], uses_poses=spec["uses_poses"],
                             target=spec.get("target", "residual"))
    expert.spec = spec
    expert.eval()
    return expert, spec


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))
