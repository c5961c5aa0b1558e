"""Named planners come from come_rl/conf/planner only (come_rl.targets.load_planner)."""

import pytest
from omegaconf import OmegaConf

from come_rl.targets import PLANNER_CONF_DIR, load_planner, planner_config, planner_names


def test_every_named_planner_is_built_with_its_yaml_settings():
    assert planner_names() == ("cem", "mppi", "nwm", "random_shooting")
    for name in planner_names():
        raw = OmegaConf.to_container(OmegaConf.load(PLANNER_CONF_DIR / f"{name}.yaml"))
        config = planner_config(name, seed=7, replan_every=3)
        assert config.seed == 7
        if "warm_start_shift" in raw:
            assert config.warm_start_shift == 3
        planner = load_planner(name, seed=7, replan_every=3)
        for key in ("population", "elites", "iterations", "num_samples", "top_k", "repeats", "temperature"):
            if key in raw:
                assert getattr(planner, key) == raw[key], (name, key)


def test_overrides_apply_and_typos_are_refused():
    cem = load_planner("cem", population=8, elites=2, iterations=3)
    assert (cem.population, cem.elites, cem.iterations) == (8, 2, 3)
    with pytest.raises(ValueError, match="has no setting \\['populaton'\\]"):
        planner_config("cem", populaton=8)
    with pytest.raises(ValueError, match="unknown planner 'beam'.*cem, mppi, nwm, random_shooting"):
        load_planner("beam")


def test_the_nwm_protocol_builds_its_planners_from_conf_at_its_budget():
    from agents.nwm_protocol import build_planner

    nwm = build_planner("nwm", population=16, elites=4, iterations=1, seed=0)
    assert (nwm.num_samples, nwm.top_k, nwm.repeats) == (16, 4, 1)
    mppi = build_planner("mppi", population=16, elites=4, iterations=2, seed=0)
    assert (mppi.population, mppi.iterations, mppi.temperature) == (16, 2, 0.5)
    with pytest.raises(ValueError, match="unknown planner"):
        build_planner("beam", 16, 4, 1, 0)
