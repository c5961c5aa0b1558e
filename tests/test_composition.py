"""The composition rule against closed forms, and the paper's toy example (appendix A, figure 4)."""

import math

import pytest
import torch

from come_rl.composition import Composer, ExpertTerm, compose_noise_predictions
from come_rl.diffusion import CosineSchedule, SamplerConfig, sample

MEANS = torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0])
KERNEL_STD = 0.4
SCHEDULE = CosineSchedule()
# Two experts whose mode weights decay from the left; they agree that the leftmost mode is the heaviest, and each
# carries a different spurious second mode. Their contrastive baselines weigh all modes equally (paper figure 4b).
EXPERT_WEIGHTS = [torch.tensor([0.50, 0.30, 0.10, 0.05, 0.05]), torch.tensor([0.45, 0.10, 0.35, 0.05, 0.05])]
UNIFORM = torch.full((5,), 0.2)


def noised_log_density(x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log p_t(x) of a 1-D Gaussian mixture pushed through the forward diffusion to level t (exact)."""
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    var = alpha[:, None] ** 2 * KERNEL_STD**2 + sigma[:, None] ** 2
    comp = -0.5 * (x[:, None] - alpha[:, None] * MEANS) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)
    return torch.logsumexp(comp + torch.log(weights), dim=1)


def analytic_eps(weights: torch.Tensor):
    """eps(x_t, t) = -sigma_t * d/dx log p_t(x) for the mixture, computed exactly by autograd."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(noised_log_density(x.flatten(), t, weights).sum(), x)
        _, sigma = SCHEDULE.alpha_sigma(t)
        return -sigma.reshape(-1, *([1] * (x.dim() - 1))) * score

    return eps


def composed(alpha: float):
    experts = [analytic_eps(w) for w in EXPERT_WEIGHTS]
    baselines = [analytic_eps(UNIFORM) for _ in EXPERT_WEIGHTS]

    def eps(x, t):
        return compose_noise_predictions([e(x, t) for e in experts], [b(x, t) for b in baselines], [alpha] * 2)

    return eps


def test_combine_matches_closed_form_score_of_the_contrastive_product():
    torch.manual_seed(0)
    x, t = torch.randn(64) * 5, torch.rand(64) * 0.9 + 0.05
    alpha = 2.5
    # Closed form: log of prod_k p_k^alpha * pbar_k^(1 - alpha), differentiated exactly.
    x_req = x.clone().requires_grad_(True)
    log_p = sum(alpha * noised_log_density(x_req, t, w) + (1 - alpha) * noised_log_density(x_req, t, UNIFORM)
                for w in EXPERT_WEIGHTS)
    (score,) = torch.autograd.grad(log_p.sum(), x_req)
    expected = -SCHEDULE.alpha_sigma(t)[1] * score
    got = composed(alpha)(x[:, None], t)[:, 0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_combine_rules_by_hand():
    c1, c2, u1, u2 = (torch.full((3,), v) for v in (1.0, 2.0, 0.5, -1.0))
    # alpha=2 for expert 1: 2*1 - 0.5 = 1.5; alpha=1 for expert 2: 2 (its baseline is ignored).
    out = compose_noise_predictions([c1, c2], [u1, None], [2.0, 1.0], weights=[1.0, 3.0])
    assert torch.allclose(out, torch.full((3,), 1.5 + 3 * 2.0))
    normalized = compose_noise_predictions([c1, c2], [u1, None], [2.0, 1.0], weights=[1.0, 3.0], normalize=True)
    assert torch.allclose(normalized, torch.full((3,), (1.5 + 6.0) / 4.0))
    with pytest.raises(ValueError, match="baseline"):
        compose_noise_predictions([c1], [None], [2.0])
    with pytest.raises(ValueError, match="one baseline and one alpha"):
        compose_noise_predictions([c1, c2], [u1], [1.0, 1.0])


def mass_on_consistent_mode(alpha: float, n: int = 4000) -> float:
    samples = sample(composed(alpha), (n, 1), SCHEDULE, SamplerConfig(steps=200, eta=1.0, clip_x0=0.0),
                     generator=torch.Generator().manual_seed(0))
    return ((samples[:, 0] - MEANS[0]).abs() < 1.5).float().mean().item()


def test_poce_puts_most_mass_on_the_mode_consistent_across_experts_and_poe_does_not():
    poe, poce = mass_on_consistent_mode(1.0), mass_on_consistent_mode(3.0)
    # Closed form for disjoint kernels (Proposition 1): PoE weights ~ pi_A * pi_B -> 0.225 / 0.295 = 76 % on mode 0;
    # PoCE with alpha = 3 and uniform baselines ~ (pi_A * pi_B)^3 -> 99 %.
    assert poce >= 0.90, poce
    assert poe < 0.90, poe
    assert poce > poe + 0.1


class CountingExpert(torch.nn.Module):
    """A closed-form 'expert': eps = x * scale (+ 1 when its context is dropped); counts network calls and rows."""

    context_frames = 1
    uses_poses = False

    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.calls, self.rows = scale, 0, 0

    def prepare(self, context, actions, poses=None, drop_context=None):
        return drop_context.float()

    def predict_eps(self, state, x_t, t):
        self.calls += 1
        self.rows += x_t.shape[0]
        return x_t * self.scale + state[:, None]


def test_composer_batches_distinct_passes_and_shares_the_ltm_baseline():
    base, ltm, stm = CountingExpert(1.0), CountingExpert(2.0), CountingExpert(3.0)
    composer = Composer([ExpertTerm("base", base, 1.0), ExpertTerm("ltm", ltm, 3.0, baseline="base"),
                         ExpertTerm("stm", stm, 2.0)])
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    denoise = composer.bind({"base": cond, "ltm": cond, "stm": cond})
    x = torch.ones(4, 1)
    eps = denoise(x, torch.zeros(4))
    # base: 1; ltm: 3*2 - 2*base(1) = 4; stm: 2*3 - 1*(3 + 1) = 2  -> 7
    assert torch.allclose(eps, torch.full((4, 1), 7.0))
    # One network call per expert per step: 3 calls, 4 distinct (expert, condition) pairs of rows (stm paired).
    assert (base.calls, ltm.calls, stm.calls) == (1, 1, 1)
    assert (base.rows, ltm.rows, stm.rows) == (4, 4, 8)
    assert composer.network_calls == 3


def test_composer_skips_the_base_pass_when_its_coefficient_cancels():
    """Paper eq. 4 with alpha_LTM = 2: the base's conditional term cancels the LTM's baseline exactly."""
    base, ltm = CountingExpert(1.0), CountingExpert(2.0)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    x = torch.ones(4, 1)
    for alpha, base_calls, expected in ((2.0, 0, 2.0 * 2 / 2), (3.0, 1, (1 + 3 * 2 - 2 * 1) / 2)):
        base.calls = ltm.calls = 0
        composer = Composer([ExpertTerm("base", base, 1.0), ExpertTerm("ltm", ltm, alpha, baseline="base")],
                            normalize=True)
        denoise = composer.bind({"base": cond, "ltm": cond})
        eps = denoise(x, torch.zeros(4))
        assert torch.allclose(eps, torch.full((4, 1), expected)), (alpha, eps)
        assert (base.calls, ltm.calls) == (base_calls, 1)


def test_a_gated_term_takes_part_only_above_its_noise_level():
    base, ltm = CountingExpert(1.0), CountingExpert(2.0)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    composer = Composer([ExpertTerm("base", base, 1.0), ExpertTerm("ltm", ltm, 2.0, baseline="base", active_from=0.9)],
                        normalize=True)
    denoise = composer.bind({"base": cond, "ltm": cond})
    x = torch.ones(4, 1)
    high = denoise(x, torch.full((4,), 0.95))  # (1 + 2*2 - 1) / 2 = 2: the LTM alone, base pass skipped
    assert torch.allclose(high, torch.full((4,), 2.0).view(4, 1))
    assert (base.calls, ltm.calls) == (0, 1)
    low = denoise(x, torch.full((4,), 0.5))  # LTM gated off: the base alone
    assert torch.allclose(low, torch.ones(4, 1))
    assert (base.calls, ltm.calls) == (1, 1)


def test_pairwise_composition_adds_each_experts_two_term_edit_to_the_base():
    """pairwise=True: eps = eps_base + sum_k w_k / (w_base + w_k) (term_k - eps_base). One expert: the normalised rule.
    Several: each expert adds what it adds with the base alone (the normalised mean over all terms would dilute the
    LTM: with 4 terms an alpha of 5 acts as 2.5 / 2)."""
    base, ltm, stm, sltm = CountingExpert(1.0), CountingExpert(2.0), CountingExpert(3.0), CountingExpert(5.0)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    x = torch.ones(4, 1)
    terms = {"base": ExpertTerm("base", base, 1.0), "ltm": ExpertTerm("ltm", ltm, 5.0, baseline="base"),
             "stm": ExpertTerm("stm", stm, 2.0), "sltm": ExpertTerm("sltm", sltm, 2.0, weight=0.5)}

    def eps(names, **kwargs):
        composer = Composer([terms[name] for name in names], **kwargs)
        denoise = composer.bind({name: cond for name in names})
        return denoise(x, torch.zeros(4))

    # terms at x = 1: base 1; ltm 5*2 - 4*1 = 6; stm 2*3 - (3 + 1) = 2; sltm 2*5 - (5 + 1) = 4 (weight 0.5)
    for name in ("ltm", "stm"):
        assert torch.allclose(eps(["base", name], pairwise=True), eps(["base", name], normalize=True), atol=1e-6)
    want = 1 + 0.5 * (6 - 1) + 0.5 * (2 - 1) + (0.5 / 1.5) * (4 - 1)
    assert torch.allclose(eps(["base", "ltm", "stm", "sltm"], pairwise=True), torch.full((4, 1), want))
    diluted = (1 + 6 + 2 + 0.5 * 4) / 3.5  # the normalised mean: the LTM's edit shrinks as experts are added
    assert torch.allclose(eps(["base", "ltm", "stm", "sltm"], normalize=True), torch.full((4, 1), diluted))
    assert abs(want - diluted) > 1.5
    with pytest.raises(ValueError, match="anchors on its first term"):
        Composer([terms["ltm"], terms["base"]], pairwise=True)


def test_pairwise_gating_drops_a_gated_expert_and_keeps_the_others_edits():
    base, ltm, stm = CountingExpert(1.0), CountingExpert(2.0), CountingExpert(3.0)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    composer = Composer([ExpertTerm("base", base, 1.0), ExpertTerm("ltm", ltm, 5.0, baseline="base", active_from=0.8),
                         ExpertTerm("stm", stm, 2.0)], pairwise=True)
    denoise = composer.bind({"base": cond, "ltm": cond, "stm": cond})
    x = torch.ones(4, 1)
    assert torch.allclose(denoise(x, torch.full((4,), 0.9)), torch.full((4, 1), 1 + 0.5 * 5 + 0.5 * 1))
    assert torch.allclose(denoise(x, torch.full((4,), 0.5)), torch.full((4, 1), 1 + 0.5 * 1))


def test_split_gates_run_the_ltms_pair_above_and_the_short_term_pair_below_two_rows_per_step():
    """CoME with the LTM gated to t >= 0.8 and the STM / SLTM (alpha 1) to t < 0.8, pairwise: above the gate
    eps = base + 2.5 (ltm - base) (the base and the LTM run), below it eps = (stm + sltm) / 2 (the base's coefficient is
    0, so only the STM and SLTM run): two network calls at every step instead of four at the LTM's steps."""
    from come_rl.composition import CompositionConfig, build_composer

    experts = {"base": CountingExpert(1.0), "ltm": CountingExpert(2.0), "stm": CountingExpert(3.0),
               "sltm": CountingExpert(5.0)}
    config = CompositionConfig(experts=["base", "ltm", "stm", "sltm"], alphas={"base": 1.0, "ltm": 5.0, "stm": 1.0,
                                                                                "sltm": 1.0},
                               active_from={"ltm": 0.8}, active_below={"stm": 0.8, "sltm": 0.8}, pairwise=True)
    composer = build_composer(config, experts)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    denoise = composer.bind({name: cond for name in experts})
    x = torch.ones(4, 1)
    assert torch.allclose(denoise(x, torch.full((4,), 0.9)), torch.full((4, 1), 1 + 2.5 * (2 - 1)))
    assert [experts[n].calls for n in experts] == [1, 1, 0, 0]
    assert torch.allclose(denoise(x, torch.full((4,), 0.8)), torch.full((4, 1), 1 + 2.5 * (2 - 1)))  # the gate is in
    assert torch.allclose(denoise(x, torch.full((4,), 0.5)), torch.full((4, 1), (3 + 5) / 2))
    assert [experts[n].calls for n in experts] == [2, 2, 1, 1]
    assert composer.network_calls == 6  # 2 per step, 3 steps
    with pytest.raises(ValueError, match="never take part"):
        CompositionConfig(experts=["base", "stm"], active_from={"stm": 0.8}, active_below={"stm": 0.5})


class _DistinctExpert(torch.nn.Module):
    """A stand-in denoiser whose conditional, unconditional and per-level predictions all differ."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def prepare(self, context, actions, poses=None, drop_context=None):
        return context.flatten(1).mean(1) * (1.0 - drop_context.float()) + 0.1 * self.scale * drop_context.float()

    def predict_eps(self, state, x_t, t):
        return x_t * self.scale + state[:, None] + torch.sin(3.0 * t)[:, None] * self.scale


@pytest.mark.parametrize("checkpoint", ["memory_cards", "memory_maze"])
@pytest.mark.parametrize("enabled", ["shipped", "all"])
def test_every_shipped_rule_gives_what_the_reference_composer_gives(checkpoint, enabled):
    """The batched Composer (shared baselines, skipped passes, gates) against the ReferenceComposer (every pass run)
    on each shipped world_model.json's rule, at noise levels on both sides of every gate."""
    import dataclasses
    import json
    from pathlib import Path

    from come_rl.composition import EXPERT_ROLES, CompositionConfig, ReferenceComposer, build_composer

    spec = json.loads((Path(__file__).resolve().parents[1] / "come_rl" / "checkpoints" / checkpoint /
                       "world_model.json").read_text())["composition"]
    config = CompositionConfig(**spec)
    if enabled == "all":
        config = dataclasses.replace(config, experts=list(EXPERT_ROLES))
    experts = {role: _DistinctExpert(scale) for role, scale in zip(EXPERT_ROLES, (0.5, 1.5, -0.7, 2.5))}
    fast, reference = build_composer(config, experts), build_composer(config, experts, reference=True)
    assert isinstance(reference, ReferenceComposer) and not isinstance(fast, ReferenceComposer)
    generator = torch.Generator().manual_seed(0)
    conditions = {role: {"context": torch.randn(3, 2, 4, generator=generator),
                         "actions": torch.zeros(3, 3, 1)} for role in config.experts}
    x = torch.randn(3, 5, generator=generator)
    gates = {*config.active_from.values(), *config.active_below.values()}
    levels = sorted({0.02, 0.3, 0.7, 0.99, *gates, *(g - 1e-3 for g in gates)})
    fast_denoise, reference_denoise = fast.bind(conditions), reference.bind(conditions)
    for level in levels:
        t = torch.full((3,), float(level))
        assert torch.allclose(fast_denoise(x, t), reference_denoise(x, t), atol=1e-6), (checkpoint, enabled, level)
    assert fast.network_calls < reference.network_calls  # what the batching saves


def test_combine_modes_by_hand_and_one_memory_term_is_the_pairwise_rule():
    """combine= adds the pairwise deltas of the memory experts element by element: sum (linear), mean, max (the delta
    of largest magnitude), agree (the largest where all agree in sign, else the sum)."""
    from come_rl.composition import combine_deltas

    a, b = torch.tensor([1.0, -1.0, 2.0, -3.0]), torch.tensor([2.0, 1.0, -1.0, -1.0])
    assert torch.equal(combine_deltas([a, b], "sum"), torch.tensor([3.0, 0.0, 1.0, -4.0]))
    assert torch.equal(combine_deltas([a, b], "mean"), torch.tensor([1.5, 0.0, 0.5, -2.0]))
    assert torch.equal(combine_deltas([a, b], "max"), torch.tensor([2.0, -1.0, 2.0, -3.0]))
    assert torch.equal(combine_deltas([a, b], "agree"), torch.tensor([2.0, 0.0, 1.0, -3.0]))
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_deltas([a], "median")

    base, ltm, stm = CountingExpert(1.0), CountingExpert(2.0), CountingExpert(3.0)
    cond = {"context": torch.zeros(4, 1, 1), "actions": torch.zeros(4, 2, 1)}
    x = torch.ones(4, 1)

    def eps(combine, names=("base", "ltm", "stm"), t=0.0):
        terms = {"base": ExpertTerm("base", base, 1.0), "ltm": ExpertTerm("ltm", ltm, 2.0, baseline="base"),
                 "stm": ExpertTerm("stm", stm, 1.0, weight=3.0)}
        composer = Composer([terms[n] for n in names], pairwise=True, combine=combine)
        return composer.bind({n: cond for n in names})(x, torch.full((4,), t))

    # at x = 1: base 1; ltm term 2*2 - 1 = 3, share 1/2 -> delta 1; stm term 3, share 3/4 -> delta 1.5
    for combine, want in (("sum", 1 + 1 + 1.5), ("mean", 1 + 1.25), ("max", 1 + 1.5), ("agree", 1 + 1.5)):
        assert torch.allclose(eps(combine), torch.full((4, 1), want)), combine
    base.calls = 0
    for combine in ("mean", "max", "agree"):  # one memory term: every mode is the pairwise rule, base pass skipped
        assert torch.allclose(eps(combine, ("base", "ltm")), eps("sum", ("base", "ltm")))
    assert base.calls == 0
    with pytest.raises(ValueError, match="needs pairwise"):
        Composer([ExpertTerm("base", base, 1.0), ExpertTerm("stm", stm, 1.0)], combine="max")


def test_every_combine_mode_runs_the_same_through_the_reference_composer():
    from come_rl.composition import CompositionConfig, build_composer

    experts = {role: CountingExpert(scale) for role, scale in (("base", 1.0), ("ltm", 2.0), ("stm", -3.0),
                                                                ("sltm", 0.5))}
    cond = {"context": torch.zeros(3, 1, 1), "actions": torch.zeros(3, 2, 1)}
    x = torch.randn(3, 1, generator=torch.Generator().manual_seed(0))
    for combine in ("mean", "max", "agree"):
        config = CompositionConfig(experts=["base", "ltm", "stm", "sltm"], alphas={"ltm": 2.0, "stm": 1.5},
                                   pairwise=True, combine=combine, active_from={"ltm": 0.5})
        for t in (0.2, 0.8):
            fast = build_composer(config, experts).bind({r: cond for r in experts})(x, torch.full((3,), t))
            slow = build_composer(config, experts, reference=True).bind({r: cond for r in experts})(x, torch.full((3,), t))
            assert torch.allclose(fast, slow, atol=1e-6), (combine, t)
    with pytest.raises(ValueError, match="combine must be"):
        CompositionConfig(combine="max")  # pairwise is off


def test_one_ddim_step_queries_only_t1_so_the_maze_ltm_gate_does_not_change_the_first_command():
    """The first command samples with 1 DDIM step: the denoiser is asked at t = 1 only, so the maze checkpoint's LTM
    gate (shipped or none) gives the same samples there; at 10 steps it does not (the gate is a real choice)."""
    import dataclasses
    import json
    from pathlib import Path

    from come_rl.composition import CompositionConfig, build_composer

    spec = json.loads((Path(__file__).resolve().parents[1] / "come_rl" / "checkpoints" / "memory_maze" /
                       "world_model.json").read_text())["composition"]
    experts = {role: _DistinctExpert(scale) for role, scale in zip(("base", "ltm"), (0.5, 1.5))}
    conditions = {role: {"context": torch.full((2, 2, 4), 0.3), "actions": torch.zeros(2, 3, 1)} for role in experts}
    samples = {}
    for steps in (1, 10):
        for gate in (0.5, 0.0):
            config = dataclasses.replace(CompositionConfig(**spec), experts=["base", "ltm"], active_from={"ltm": gate})
            levels = []
            denoise = build_composer(config, experts).bind(conditions)

            def recorded(x, t, denoise=denoise, levels=levels):
                levels.extend(t.tolist())
                return denoise(x, t)

            samples[steps, gate] = sample(recorded, (2, 5), CosineSchedule(), SamplerConfig(steps=steps),
                                          generator=torch.Generator().manual_seed(3))
            assert (set(levels) == {1.0}) == (steps == 1)
    assert torch.equal(samples[1, 0.5], samples[1, 0.0])
    assert not torch.allclose(samples[10, 0.5], samples[10, 0.0], atol=1e-4)
