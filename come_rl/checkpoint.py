"""Save and load experts: weights in safetensors, the recipe that rebuilds them in JSON beside them.

A checkpoint directory holds ``<name>.safetensors`` + ``<name>.json``. The JSON says which backbone to build and how
(``backbone``, ``backbone_kwargs``), the schedule, the expert's role and the action space, so a checkpoint is
self-describing and a mismatch (a base checkpoint loaded as an STM, a wrong action space) is caught with a clear error.

The JSON also records the SHA-256 of the weight file (``"sha256"``). Safetensors only checks its header, so a file
damaged in its tensor bytes (a bad copy, a flipped bit, a stray edit) would otherwise load and quietly predict garbage;
the sum turns that into an error at load. Checkpoints written before sums were recorded carry none and still load;
``python -m come_rl.checkpoint sign DIR`` adds them. Every load also refuses NaN/inf weights, which the sum cannot catch
(a diverged run is saved, and summed, faithfully).
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from come_rl import devices
from come_rl.cli_args import HELP_FLAGS, help_text, parse_cli
from come_rl.diffusion import SamplerConfig, build_schedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.io_utils import atomic_write_bytes, atomic_write_text, sha256_file
from come_rl.nets.registry import build_backbone

FORMAT_VERSION = 1
SHA256_KEY = "sha256"
_SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")


def packaged_checkpoints_dir() -> Path:
    """``come_rl/checkpoints``: where the trained CPU-size world models ship inside the package."""
    return Path(__file__).resolve().parent / "checkpoints"


def resolve_checkpoint(checkpoint: str | Path, what: str = "checkpoint", packaged_dir: Path | None = None,
                       hint: str = "train a world model first (see README) and pass its directory") -> Path:
    """The one rule for naming a checkpoint: an existing path is used as it is; a bare name (``memory_maze``) is a
    checkpoint shipped in the package (``packaged_dir``, default :func:`packaged_checkpoints_dir`). Otherwise a
    FileNotFoundError names both places looked at, the shipped checkpoints and ``hint``."""
    text = str(checkpoint)
    packaged_dir = packaged_checkpoints_dir() if packaged_dir is None else Path(packaged_dir)
    as_path = Path(text).expanduser()
    if as_path.exists():
        return as_path
    if "/" not in text and "\\" not in text:
        packaged = packaged_dir / text
        if packaged.exists():
            return packaged
        where = f"{str(as_path.absolute())!r} nor {str(packaged)!r}"
    else:
        where = repr(str(as_path.absolute()))
    available = sorted(p.name for p in packaged_dir.iterdir()) if packaged_dir.is_dir() else []
    raise FileNotFoundError(f"{what}={text!r} does not exist (looked at {where}); packaged checkpoints: "
                            f"{available or 'none'}. {hint[:1].upper() + hint[1:]}")


def world_model_settings(checkpoint: str | Path) -> dict:
    """The default settings a checkpoint's ``world_model.json`` gives its world model (composition, sampler, memorize,
    ...); {} without the file. A name is resolved as :func:`resolve_checkpoint` does."""
    path = resolve_checkpoint(checkpoint) / "world_model.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt, re-copy it or delete the file "
                         f"to use the defaults") from error


def sampler_steps_for(checkpoint: str | Path, steps: int = 0) -> int:
    """``steps`` when given (>= 1), else the denoising steps the checkpoint samples with by default (its
    ``world_model.json``; the sampler's own default without one): what an evaluation's ``sampler_steps=0`` means."""
    if steps:
        return int(steps)
    return int(world_model_settings(checkpoint).get("sampler", {}).get("steps", SamplerConfig().steps))


def precision_for(checkpoint: str | Path, precision: str = "auto", device: str | torch.device = "auto") -> str:
    """The precision (``"fp32"`` or ``"bf16"``) that ``WorldModel.load(checkpoint, precision=..., device=...)`` runs
    in: ``auto`` is bf16 on CUDA and, on the CPU, the checkpoint's ``cpu_precision`` (world_model.json) where the CPU
    has bfloat16 kernels. Evaluations record it, so that a table never mixes two precisions."""
    return devices.resolve_precision(precision, devices.resolve_device(device), cpu_auto=cpu_precision_of(checkpoint))


def cpu_precision_of(checkpoint: str | Path) -> str:
    """What ``precision=auto`` means for ``checkpoint`` on a CPU with bfloat16 kernels: its world_model.json's
    ``cpu_precision`` (fp32 without one)."""
    return world_model_settings(checkpoint).get("cpu_precision", "fp32")


def expert_spec(expert: DiffusionExpert, backbone_name: str, backbone_kwargs: dict, extra: dict | None = None) -> dict:
    spec = {
        "format_version": FORMAT_VERSION,
        "role": expert.name,
        "backbone": backbone_name,
        "backbone_kwargs": backbone_kwargs,
        "schedule": type(expert.schedule).__name__.replace("Schedule", "").lower(),
        "uses_poses": expert.uses_poses,
        "target": expert.target,
        "prediction": expert.prediction,
    }
    spec.update(extra or {})
    return spec


def save_expert(directory: str | Path, expert: DiffusionExpert, spec: dict, state_dict: dict | None = None,
                half: bool = False) -> Path:
    """Write ``<directory>/<role>.safetensors`` and ``.json`` atomically; ``state_dict`` overrides the weights (EMA)."""
    directory = Path(directory)
    state = state_dict if state_dict is not None else expert.backbone.state_dict()
    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().to("cpu").contiguous().clone()
               for k, v in state.items()}
    role = spec["role"]
    weights = directory / f"{role}.safetensors"
    # Serialized in memory, then written atomically: a full disk gives a clear error (come_rl.io_utils.WriteError)
    # naming the file and the bytes it needed, and leaves the previous file and no temporary file.
    atomic_write_bytes(weights, save_safetensors(tensors))
    # The sum of the file as written (a spec copied from a loaded expert carries the old file's sum: replace it).
    atomic_write_text(directory / f"{role}.json", _recipe_text(_with_sha256(spec, sha256_file(weights))))
    return weights


def _recipe_text(spec: dict) -> str:
    """A recipe's JSON text: one format for ``save_expert`` and ``sign_checkpoint``, so signing rewrites no line."""
    return json.dumps(spec, indent=2)


def _with_sha256(spec: dict, digest: str) -> dict:
    """``spec`` with ``"sha256": digest`` right after ``format_version`` (first if there is none).

    A fixed place near the top, rather than the end, makes signing an old checkpoint add exactly one line to its JSON:
    appending would also put a comma on the line before, and a reviewer should see only the sum change.
    """
    signed: dict = {} if "format_version" in spec else {SHA256_KEY: digest}
    for key, value in spec.items():
        if key == SHA256_KEY:
            continue
        signed[key] = value
        if key == "format_version":
            signed[SHA256_KEY] = digest
    return signed


def verify_sha256(weights: Path, recipe: Path, spec: dict) -> None:
    """Raise ValueError if ``recipe`` records a SHA-256 that ``weights`` does not have; no entry means nothing to check.

    Checked before the file is parsed: damage in the tensor bytes parses fine, and a damaged header should be reported
    as the same thing (the file is not the one that was saved), with the same fixes.
    """
    recorded = spec.get(SHA256_KEY)
    if recorded is None:  # written before sums were recorded, or the entry was deleted to accept the file as it is
        return
    if not isinstance(recorded, str) or not _SHA256_PATTERN.fullmatch(recorded):
        raise ValueError(f'{recipe} has a malformed "{SHA256_KEY}" entry {recorded!r} (expected 64 hex digits); '
                         f"re-copy the checkpoint, or delete the entry to load {weights.name} unchecked")
    actual = sha256_file(weights)
    if actual != recorded.lower():
        raise ValueError(
            f"{weights} does not match its recorded SHA-256 (recorded in {recipe.name}: {recorded.lower()}, file: "
            f"{actual}): the weights are corrupt or were modified after they were saved. Re-copy the checkpoint "
            f"directory (or retrain the expert); if the file was changed on purpose and you trust it, delete the "
            f'"{SHA256_KEY}" entry from {recipe} (or run `python -m come_rl.checkpoint sign {weights.parent} --force` '
            f"to record the new sum)")


def check_finite(weights: Path, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming ``weights`` and its tensors that hold NaN or inf.

    Such weights load without complaint and make every prediction NaN, which surfaces far away (a planner's scores, an
    image metric); the cause is in the file: a diverged run, or float32 values beyond float16's range saved as half.
    """
    bad = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad[name] = (count, tensor.numel())
    if bad:
        shown = ", ".join(f"{name!r} ({count} of {numel})" for name, (count, numel) in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
        raise ValueError(f"{weights} has NaN or inf weights in tensor {shown}{more}; the checkpoint is unusable (the "
                         f"training diverged, or float32 values overflowed a float16 save): retrain, or use an earlier "
                         f"checkpoint of the run")


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
    verify_sha256(weights, recipe, spec)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {weights} ({error}); the file is corrupt or truncated, retrain or re-copy it") from error
    check_finite(weights, state)
    backbone = build_backbone(spec["backbone"], **spec["backbone_kwargs"])
    reference = backbone.state_dict()
    missing, unexpected = set(reference) - set(state), set(state) - set(reference)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its recipe {recipe.name}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    backbone.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    # Checkpoints written before targets were recorded all predict the residual.
    expert = DiffusionExpert(backbone, build_schedule(spec["schedule"]), name=spec["role"], uses_poses=spec["uses_poses"],
                             target=spec.get("target", "residual"), prediction=spec.get("prediction", "v"))
    expert.spec = spec
    expert.eval()
    return expert, spec


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to memory, then an atomic write (a full disk: a clear error, the old file intact)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(path), buffer.getbuffer())


def _expert_recipes(directory: Path) -> list[tuple[Path, Path]]:
    """``(<role>.json, <role>.safetensors)`` pairs in ``directory``; other JSON (world_model.json) has no weights."""
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    return [(recipe, recipe.with_suffix(".safetensors")) for recipe in sorted(directory.glob("*.json"))
            if recipe.with_suffix(".safetensors").is_file()]


def sign_checkpoint(directory: str | Path, force: bool = False) -> list[Path]:
    """Record the SHA-256 of every ``<role>.safetensors`` in ``directory`` in its ``<role>.json``; returns the JSON
    files rewritten.

    For checkpoints saved before sums were recorded. Only the ``"sha256"`` entry changes (the rest of the JSON is
    rewritten in the format ``save_expert`` writes, atomically); a file that already carries the right sum is left
    alone. The weights must parse and be finite: signing vouches for them. A recorded sum that differs is refused
    unless ``force`` (the file changed since it was signed, which is what the sum is there to catch).
    """
    directory = Path(directory)
    rewritten = []
    for recipe, weights in _expert_recipes(directory):
        text = recipe.read_text()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{recipe} is not valid JSON ({error}); re-copy the checkpoint before "
                             "signing it") from error
        if not isinstance(spec, dict):
            raise ValueError(f"{recipe} holds {type(spec).__name__}, not an expert recipe (a JSON object)")
        digest = sha256_file(weights)
        recorded = spec.get(SHA256_KEY)
        if recorded == digest:
            continue
        if recorded is not None and not force:
            raise ValueError(f"{recipe} records SHA-256 {recorded} but {weights} has {digest}: the weights changed "
                             f"since they were signed. Re-copy the checkpoint, or pass --force to record the new sum")
        try:
            check_finite(weights, load_file(str(weights)))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {weights} ({error}); the file is corrupt or truncated, "
                             "not signing it") from error
        new_text = _recipe_text(_with_sha256(spec, digest)) + ("\n" if text.endswith("\n") else "")
        unchanged = {key: value for key, value in json.loads(new_text).items() if key != SHA256_KEY}
        if unchanged != {key: value for key, value in spec.items() if key != SHA256_KEY}:  # pragma: no cover - a bug
            raise AssertionError(f"signing {recipe} would change more than its {SHA256_KEY!r} entry")
        atomic_write_text(recipe, new_text)
        rewritten.append(recipe)
    return rewritten


@dataclass
class CheckpointCommand:
    """The settings of ``python -m come_rl.checkpoint sign|verify DIR...``."""

    directories: list[str] = field(default_factory=list)
    """checkpoint directories; bare arguments after the command are added to them."""
    force: bool = False
    """sign: replace a recorded sum that no longer matches its weights (``--force`` is the same)."""


CHECKPOINT_USAGE = "usage: python -m come_rl.checkpoint sign|verify DIR... [force=true]"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m come_rl.checkpoint sign DIR... [force=true]`` records weight sums; ``verify DIR...`` loads every
    expert in each directory (sum, format and finiteness checks) and exits non-zero on the first failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(argument in HELP_FLAGS for argument in argv):
        print(help_text(CheckpointCommand, f"{CHECKPOINT_USAGE}\n{main.__doc__}"))
        raise SystemExit(0)
    if not argv or argv[0] not in ("sign", "verify"):
        raise SystemExit(f"the first argument is the command, sign or verify; {CHECKPOINT_USAGE}")
    command, rest = argv[0], argv[1:]
    bare = [argument for argument in rest if "=" not in argument and argument != "--force"]
    overrides = [argument for argument in rest if "=" in argument] + (["force=true"] if "--force" in rest else [])
    config = parse_cli(overrides, CheckpointCommand, CHECKPOINT_USAGE)
    directories = [Path(directory) for directory in [*config.directories, *bare]]
    if not directories:
        raise SystemExit(f"name at least one checkpoint directory; {CHECKPOINT_USAGE}")
    try:
        _run_checkpoint_command(command, directories, config.force)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error


def _verify_plain_weights(directory: Path, role: str) -> None:
    """Check a non-expert weight file (the odometry head) the way its own loader does: recorded sum, finite weights.

    Kept here rather than calling ``come_rl.odometry.load_odometry``, which imports this module (no import circle).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, recipe = directory / f"{role}.safetensors", directory / f"{role}.json"
    try:
        spec = json.loads(recipe.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{recipe} is not valid JSON ({error}); re-copy the checkpoint directory") from error
    verify_sha256(weights, recipe, spec)
    try:
        state = load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error}); re-copy the checkpoint") from error
    check_finite(weights, state)


def _run_checkpoint_command(command: str, directories: list[Path], force: bool) -> None:
    for directory in directories:
        if command == "sign":
            rewritten = sign_checkpoint(directory, force=force)
            print(f"{directory}: signed {[p.name for p in rewritten] or 'nothing (all sums recorded)'}")
        else:
            roles = [recipe.stem for recipe, _ in _expert_recipes(directory)]
            for role in roles:
                if role == "odometry":  # the pose model (come_rl.odometry), not an expert: sum and finite weights
                    _verify_plain_weights(directory, role)
                    print(f"{directory}/{role}: ok (sha256 verified)")
                    continue
                _, spec = load_expert(directory, role)
                print(f"{directory}/{role}: ok ({'sha256 verified' if SHA256_KEY in spec else 'no sha256 recorded'})")
            if not roles:
                raise SystemExit(f"{directory} holds no <role>.json + <role>.safetensors pair")


if __name__ == "__main__":
    main()
