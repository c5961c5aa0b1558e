"""Every script's settings are composed by Hydra from its dataclass (come_rl.cli_args): types checked, typos named,
earlier commands (text with commas, JSON dicts) kept working, --help listing the keys."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from come_rl.cli_args import field_kinds, parse_cli, parse_dataclass

# (module, dataclass, arguments every script needs) for each entry point that is not come_rl.run (Hydra + YAML groups)
SCRIPT_CONFIGS = [
    ("come_rl.train", "TrainConfig", []),
    ("come_rl.evaluate", "EvaluateConfig", []),
    ("come_rl.collect", "CollectConfig", ["env=memory_cards", "episodes=2", "steps=3", "out=x"]),
    ("come_rl.experiments.recall", "RecallConfig", []),
    ("come_rl.bench.world_model", "WorldModelBenchConfig", []),
    ("come_rl.bench.decision", "DecisionBenchConfig", []),
    ("come_rl.bench.memorize", "MemorizeBenchConfig", []),
    ("come_rl.bench.threads", "ThreadsBenchConfig", []),
    ("come_rl.bench.long_episode", "LongEpisodeBenchConfig", []),
    ("come_rl.bench.planners", "PlannersBenchConfig", []),
    ("come_rl.bench.dit", "DitBenchConfig", []),
    ("come_rl.checkpoint", "CheckpointCommand", []),
    ("agents.nwm_protocol", "ProtocolConfig", ["checkpoint=x", "data=y"]),
    ("agents.find_object", "FindConfig", []),
    ("agents.find_object_tuning", "TuneConfig", []),
    ("agents.return_to_place", "ReturnConfig", []),
    ("agents.return_to_place_diagnosis", "DiagnosisConfig", []),
]


@pytest.mark.parametrize("module, name, required", SCRIPT_CONFIGS, ids=[f"{m}.{n}" for m, n, _ in SCRIPT_CONFIGS])
def test_every_script_config_is_composed_by_hydra_with_its_defaults(module, name, required):
    config_cls = getattr(importlib.import_module(module), name)
    composed = parse_dataclass(required, config_cls)
    assert type(composed) is config_cls
    given = dict(argument.split("=", 1) for argument in required)
    expected = config_cls(**{key: type(getattr(composed, key))(value) for key, value in given.items()})
    assert composed == expected  # every default comes through Hydra unchanged (types included)
    for field in dataclasses.fields(config_cls):
        assert type(getattr(composed, field.name)) is type(getattr(expected, field.name)), field.name


def test_values_keep_the_commands_written_before_hydra_working():
    from come_rl.experiments.recall import RecallConfig
    from come_rl.train import TrainConfig

    json_form = parse_dataclass(['backbone_overrides={"context_frames": 8, "widths": [48, 64, 96]}', "lr=3e-4",
                                 "half_weights=yes", "minutes=2"], TrainConfig)
    hydra_form = parse_dataclass(["backbone_overrides={context_frames: 8, widths: [48, 64, 96]}", "lr=0.0003",
                                  "half_weights=true", "minutes=2.0"], TrainConfig)
    assert json_form == hydra_form
    assert json_form.backbone_overrides == {"context_frames": 8, "widths": [48, 64, 96]}
    assert json_form.lr == pytest.approx(3e-4) and json_form.half_weights is True and json_form.minutes == 2.0
    dotted = parse_dataclass(["backbone_overrides.widths=[8,16]"], TrainConfig)
    assert dotted.backbone_overrides == {"widths": [8, 16]}
    # a text value is taken as it is: commas are not a Hydra sweep, quotes, backslashes and ${ are kept
    text = "CoME pairwise, STM and SLTM alpha 1"
    assert parse_dataclass([f"compositions={text}"], RecallConfig).compositions == text
    odd = r"a 'quoted' \path\ with ${no.interpolation} and \\"
    assert parse_dataclass([f"out={odd}"], TrainConfig).out == odd
    assert parse_dataclass(["out='already quoted'"], TrainConfig).out == "already quoted"
    recipe = parse_dataclass(['memorize={"steps": 100, "lr": 1e-3, "mode": "full", "layers": null}'], RecallConfig)
    assert recipe.memorize == {"steps": 100, "lr": 1e-3, "mode": "full", "layers": None}
    assert field_kinds(TrainConfig)["backbone_overrides"] == "container"
    assert field_kinds(TrainConfig)["out"] == "text" and field_kinds(TrainConfig)["steps"] == "plain"


def test_bad_arguments_name_the_key_and_what_is_valid():
    from come_rl.train import TrainConfig

    with pytest.raises(ValueError, match=r"unknown key 'lerning_rate'; valid keys: model, role, .*lr"):
        parse_dataclass(["lerning_rate=1"], TrainConfig)
    with pytest.raises(ValueError, match=r"bad value for steps: 'many' .*Integer"):
        parse_dataclass(["minutes=1", "steps=many"], TrainConfig)
    with pytest.raises(ValueError, match=r"bad value for half_weights: 'maybe'"):
        parse_dataclass(["half_weights=maybe"], TrainConfig)
    with pytest.raises(ValueError, match="arguments are key=value, got 'steps'"):
        parse_dataclass(["steps"], TrainConfig)
    with pytest.raises(ValueError, match="not a plain name"):
        parse_dataclass(['backbone_overrides={"a b": 1}'], TrainConfig)
    with pytest.raises(SystemExit, match="unknown key"):
        parse_cli(["stepz=3"], TrainConfig)


def test_help_lists_every_key_with_its_type_default_and_documentation(capsys):
    from come_rl.train import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        parse_cli(["--help"], TrainConfig)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"  {field.name}: " in text
    assert "  lr: float = 0.0005" in text
    assert "checkpoint directory; rerunning with the same out resumes." in text


def test_checkpoint_command_verifies_the_shipped_model_and_refuses_a_missing_directory(capsys):
    from come_rl.checkpoint import main, packaged_checkpoints_dir

    shipped = packaged_checkpoints_dir() / "memory_cards"
    main(["verify", str(shipped)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{shipped}/{role}: ok (sha256 verified)" for role in ("base", "sltm", "stm")]
    with pytest.raises(SystemExit, match="error: checkpoint directory .*nowhere does not exist"):
        main(["verify", f"directories=[{packaged_checkpoints_dir() / 'nowhere'}]"])
    with pytest.raises(SystemExit, match="the first argument is the command"):
        main(["check", "come_rl/checkpoints/memory_cards"])
    with pytest.raises(SystemExit, match="name at least one checkpoint directory"):
        main(["sign"])


def test_every_listed_command_answers_help(capsys):
    from come_rl.__main__ import COMMANDS, main

    main([])
    listing = capsys.readouterr().out
    for module, _ in COMMANDS:
        assert f"  {module} " in listing
        if module == "come_rl.run":  # Hydra's own --help: tests/test_cli.py::test_cli_help_lists_groups
            continue
        with pytest.raises(SystemExit) as exit_info:
            result = importlib.import_module(module).main(["--help"])
            raise SystemExit(result)
        assert exit_info.value.code in (0, None), module
        assert "=" in capsys.readouterr().out, module  # the keys with their defaults, or the usage line
