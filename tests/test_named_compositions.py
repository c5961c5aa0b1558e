"""Named composition rules live in come_rl/conf/compositions/*.yaml: each file loads, every rule builds and runs the
same through the batched and the reference composer, and the recall study's shipped rule is the checkpoint's."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from come_rl.composition import (COMPOSITIONS_CONF_DIR, EXPERT_ROLES, CompositionConfig, build_composer,
                                 load_named_compositions)
from tests.test_composition import _DistinctExpert

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in COMPOSITIONS_CONF_DIR.glob("*.yaml"))


def _levels(config: CompositionConfig) -> list[float]:
    gates = {*config.active_from.values(), *config.active_below.values()}
    return sorted({0.02, 0.3, 0.7, 0.99, *gates, *(g - 1e-3 for g in gates)})


def _denoisers(config: CompositionConfig, reference: bool = False):
    experts = {role: _DistinctExpert(scale) for role, scale in zip(EXPERT_ROLES, (0.5, 1.5, -0.7, 2.5))}
    composer = build_composer(config, experts, reference=reference)
    generator = torch.Generator().manual_seed(0)
    conditions = {role: {"context": torch.randn(3, 2, 4, generator=generator), "actions": torch.zeros(3, 3, 1)}
                  for role in EXPERT_ROLES}
    return composer.bind({role: conditions[role] for role in config.experts}), composer


def test_there_is_a_composition_file_and_the_recall_study_reads_it():
    assert "memory_cards_recall" in FILES
    from come_rl.experiments import recall

    assert recall.COMPOSITIONS == load_named_compositions("memory_cards_recall").rules
    assert recall.resolve_compositions("sweep")[0] == recall.NO_MEMORY
    assert recall.NEEDS_NO_MEMORIZATION == {"no memory (base)", "base+STM+SLTM (no LTM)",
                                            "base+STM+SLTM pairwise (no LTM)"}


@pytest.mark.parametrize("name", FILES)
def test_every_named_rule_runs_the_same_through_the_reference_composer(name):
    named = load_named_compositions(name)
    assert named.rules and named.shipped in named.rules and named.no_memory in named.rules
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    for rule in named.rules:
        config = named.config(rule)
        (fast, _), (reference, _) = _denoisers(config), _denoisers(config, reference=True)
        for level in _levels(config):
            t = torch.full((3,), float(level))
            assert torch.allclose(fast(x, t), reference(x, t), atol=1e-6), (name, rule, level)


def test_the_recall_studys_shipped_rule_composes_what_the_memory_cards_checkpoint_composes():
    named = load_named_compositions("memory_cards_recall")
    shipped = CompositionConfig(**json.loads((ROOT / "come_rl/checkpoints/memory_cards/world_model.json").read_text())
                                ["composition"])
    study = named.config(named.shipped)
    assert set(study.experts) == set(shipped.experts)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    (ours, _), (theirs, _) = _denoisers(study), _denoisers(shipped)
    for level in _levels(shipped):
        t = torch.full((3,), float(level))
        assert torch.allclose(ours(x, t), theirs(x, t), atol=1e-6), level
    # and a different rule of the file does not (the comparison can fail)
    (other, _) = _denoisers(named.config("PoCE w=3"))
    assert not torch.allclose(other(x, torch.full((3,), 0.9)), theirs(x, torch.full((3,), 0.9)), atol=1e-3)


def test_bad_composition_files_are_refused_with_the_file_and_the_entry_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no composition file"):
        load_named_compositions("no_such_study")
    bad = tmp_path / "bad.yaml"
    bad.write_text("compositions:\n  broken: {experts: [ltm]}\n")
    with pytest.raises(ValueError, match="'broken' is not a valid CompositionConfig"):
        load_named_compositions(bad)
    bad.write_text("compositions:\n  ok: {experts: [base]}\nsets:\n  some: [ok, missing]\n")
    with pytest.raises(ValueError, match="missing"):
        load_named_compositions(bad)
    bad.write_text("compositions: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_named_compositions(bad)
    named = load_named_compositions("memory_cards_recall")
    with pytest.raises(ValueError, match="unknown compositions"):
        named.resolve("PoCE w=9")
    assert named.resolve("LTM alone;PoCE w=2") == ["LTM alone", "PoCE w=2"]
    assert dataclasses.is_dataclass(named)
