"""The composition of memory experts: product of experts (PoE) and product of contrastive experts (PoCE).

The rule (paper eq. 3, 4 and its score form eq. 6), in noise-prediction form (score = -eps / sigma):

    eps = sum_k w_k * [ alpha_k * eps_k(x_t | c_k) + (1 - alpha_k) * eps_k(x_t | no c_k) ]

alpha_k = 1 is the plain product of experts; alpha_k > 1 makes expert k contrastive: modes its condition emphasises
more than its baseline are amplified, modes it merely shares with the baseline are suppressed (Proposition 1).
w_k = 1 for all k is the paper's sum of scores; ``normalize=True`` divides by sum_k w_k instead (a geometric mean of
experts rather than a product, which keeps the composed score on the scale of a single expert's).

The long-term memory's baseline p_psi(empty)(x | c) is the base model's own conditional prediction, so that forward
pass is shared rather than repeated (``baseline="<other term's name>"``).

``pairwise=True`` composes more than one memory expert without diluting any of them: each expert k adds to the
base's prediction what its normalised composition with the base alone adds,

    eps = eps_base + sum_k  w_k / (w_base + w_k) * ( term_k - eps_base ),

a product p_base * prod_k (p_k' / p_base) of the pairwise compositions p_k'. With one expert it is the normalised rule;
with several, each keeps the contrast it was tuned with (the normalised mean over 4 terms gives an LTM of alpha 2 w
only w / 2: measured, it recalled less). It is a choice of weights, so the same network calls serve it.

Summing the memory terms' deltas overshoots where several experts correct the base the same way (measured on the maze:
the STM and SLTM terms made an LTM worse). ``combine`` chooses how the pairwise deltas d_k = w_k / (w_base + w_k) *
(term_k - eps_base) add up, element by element: "sum" (the rule above, linear), "mean" (their mean over the active
memory terms), "max" (the delta of largest magnitude: each element follows the expert that moves it most), "agree"
(where every delta has the same sign, the largest of them; elsewhere their sum). With one active memory term every
choice is the rule above.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from come_rl.experts.expert import DiffusionExpert


def compose_noise_predictions(
    conditional: Sequence[torch.Tensor],
    baselines: Sequence[torch.Tensor | None],
    alphas: Sequence[float],
    weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """The composition rule above, as a pure function.

    Args:
        conditional: eps_k(x_t | c_k) for each expert, all of one shape.
        baselines: eps_k(x_t | no c_k) for each expert; may be None where alpha_k == 1 (it has weight 0 there).
        alphas: contrast coefficients alpha_k (>= 1 in the paper; any real is accepted).
        weights: w_k (default 1 each).
        normalize: divide by sum_k w_k.
    """
    k = len(conditional)
    if not (len(baselines) == len(alphas) == k) or k == 0:
        raise ValueError(f"need one baseline and one alpha per expert: {k} conditional, {len(baselines)} baselines, "
                         f"{len(alphas)} alphas")
    weights = [1.0] * k if weights is None else list(weights)
    if len(weights) != k:
        raise ValueError(f"need one weight per expert, got {len(weights)} for {k} experts")
    total = torch.zeros_like(conditional[0])
    for eps_c, eps_u, alpha, weight in zip(conditional, baselines, alphas, weights):
        if alpha != 1.0 and eps_u is None:
            raise ValueError(f"alpha={alpha} != 1 needs the expert's baseline prediction, got None")
        term = eps_c if alpha == 1.0 else alpha * eps_c + (1.0 - alpha) * eps_u
        total = total + weight * term
    if normalize:
        weight_sum = sum(weights)
        if weight_sum == 0:
            raise ValueError("normalize=True needs weights with a non-zero sum")
        total = total / weight_sum
    return total


COMBINE_MODES = ("sum", "mean", "max", "agree")


def combine_deltas(deltas: Sequence[torch.Tensor], mode: str = "sum") -> torch.Tensor:
    """How the memory experts' pairwise deltas (each of one shape) add up, element by element (module docstring)."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; choose one of {COMBINE_MODES}")
    if not deltas:
        raise ValueError("combine_deltas needs at least one delta")
    stacked = torch.stack(list(deltas))  # (K, ...)
    total = stacked.sum(0)
    if mode == "sum" or len(deltas) == 1:
        return total
    if mode == "mean":
        return total / len(deltas)
    largest = stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]
    if mode == "max":
        return largest
    agree = (stacked > 0).all(0) | (stacked < 0).all(0)
    return torch.where(agree, largest, total)


@dataclass
class ExpertTerm:
    """One factor of the composition.

    Attributes:
        name: unique label ("base", "ltm", "stm", "sltm").
        expert: the denoiser.
        alpha: contrast coefficient (1 = plain PoE factor).
        weight: w_k.
        baseline: "unconditional" (the expert's own dropped-condition mode, batched with its conditional pass) or the
            name of another term whose *conditional* prediction is this term's baseline (the LTM uses "base").
    """

    name: str
    expert: DiffusionExpert
    alpha: float = 1.0
    weight: float = 1.0
    baseline: str = "unconditional"
    active_from: float = 0.0
    """the term takes part only at noise levels t >= active_from (0 = always). An LTM memorized at t in [0.9, 1]
    is only trustworthy there; gating it lets it set the content and the base refine the details."""
    active_below: float = float("inf")
    """the term takes part only at noise levels t < active_below (inf = always): e.g. the STM and SLTM below the
    LTM's gate, so that each denoising step runs either the LTM's pair or theirs, never all four."""

    def active(self, t: float | None) -> bool:
        """Does the term take part at noise level t (None: every term)?"""
        return t is None or self.active_from <= t < self.active_below


class Composer:
    """The rule of :func:`compose_noise_predictions` over several experts; :meth:`bind` turns it into a denoiser.

    ``composer.bind(conditions)`` processes every expert's context once (conditional and unconditional rows stacked into
    one batch) and returns a plain denoiser ``(x_t, t) -> eps`` for the sampler, so each denoising step costs at most one
    network call per expert that has a term: the distinct (expert, condition) pairs are the rows of those calls, a
    baseline shared with another term costs nothing, and a pass whose total coefficient is zero is not run (see
    :meth:`conditional_coefficients`). ``network_calls`` counts the calls of every denoiser it bound.
    """

    def __init__(self, terms: Sequence[ExpertTerm], normalize: bool = False, pairwise: bool = False,
                 combine: str = "sum"):
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {combine!r}; choose one of {COMBINE_MODES}")
        if combine != "sum" and not pairwise:
            raise ValueError(f"combine={combine!r} combines the pairwise deltas of the memory experts: it needs "
                             f"pairwise=True")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"expert term names must be unique, got {names}")
        for term in terms:
            if term.baseline != "unconditional" and term.baseline not in names:
                raise ValueError(f"term {term.name!r} uses the baseline of {term.baseline!r}, which is not a term; "
                                 f"terms are {names}")
        if pairwise and (terms[0].alpha != 1.0 or terms[0].baseline != "unconditional"):
            raise ValueError(f"pairwise composition anchors on its first term, which must be a plain expert (alpha 1), "
                             f"got {terms[0].name!r} with alpha {terms[0].alpha}")
        self.terms, self.normalize, self.pairwise = list(terms), normalize and not pairwise, pairwise
        self.combine = combine
        self.network_calls = 0
        self._coefficients: dict[float | None, dict[str, float]] = {}  # conditional_coefficients by noise level

    def needs_unconditional(self, term: ExpertTerm) -> bool:
        return term.alpha != 1.0 and term.baseline == "unconditional"

    def conditional_coefficients(self, t: float | None = None) -> dict[str, float]:
        """The total linear coefficient of each term's conditional prediction in the composed eps (before
        ``normalize``'s division, which scales every coefficient alike).

        Read off the rule itself: :func:`compose_noise_predictions` is linear in the predictions, so feeding it a 1 for
        one term's conditional prediction (and for every baseline that shares it) and 0 for every other prediction
        gives that term's coefficient. A shared baseline thus adds w_k (1 - alpha_k) to the coefficient of the term it
        borrows from: with the paper's eq. 4 and alpha_LTM = 2 the base's conditional coefficient is
        w_base + w_LTM (1 - 2) = 0, and the base pass cancels and need not be run at all. Which passes a step runs
        (:meth:`skipped_terms`, ``_denoise``) follows from these numbers, so a change of the rule changes them too.
        """
        key = None if t is None else float(t)
        if key in self._coefficients:  # a sampler asks at the same levels every step of every frame
            return dict(self._coefficients[key])
        weights = self._weights(t)
        names = [term.name for term in self.terms]
        coefficients = {}
        for name in names:
            probe = {other: torch.tensor(1.0 if other == name else 0.0, dtype=torch.float64, device="cpu")
                     for other in names}
            baselines = [torch.zeros((), dtype=torch.float64, device="cpu") if term.baseline == "unconditional"
                         else probe[term.baseline] for term in self.terms]
            coefficients[name] = float(compose_noise_predictions(
                [probe[term.name] for term in self.terms], baselines, [term.alpha for term in self.terms],
                [weights[term.name] for term in self.terms], normalize=False))
        self._coefficients[key] = dict(coefficients)
        return coefficients

    def _weights(self, t: float | None) -> dict[str, float]:
        """w_k at noise level t: 0 for a gated term outside [active_from, active_below) (t = None: every term active). Pairwise: the
        weights that give the rule in the module docstring without normalising (the anchor gets 1 - sum of the rest)."""
        weights = {term.name: term.weight if term.active(t) else 0.0 for term in self.terms}
        if not self.pairwise:
            return weights
        anchor = self.terms[0].name
        shares = {name: w / (weights[anchor] + w) if w else 0.0 for name, w in weights.items() if name != anchor}
        return {anchor: 1.0 - sum(shares.values()), **shares}

    def skipped_terms(self) -> set[str]:
        """Terms whose prediction enters the sum with coefficient 0 at every noise level (added as zeros, never run);
        gates split the noise range, so the coefficients are checked just above and just below every gate."""
        gates = ({term.active_from for term in self.terms if term.active_from > 0}
                 | {term.active_below for term in self.terms if term.active_below != float("inf")})
        levels = [None, *gates, *(gate - 1e-6 for gate in gates)]
        per_level = [self.conditional_coefficients(level) for level in levels]
        needs_anchor = any(self.combines_nonlinearly(level) for level in levels)
        return {term.name for term in self.terms
                if all(c[term.name] == 0.0 for c in per_level) and not self.needs_unconditional(term)
                and not (needs_anchor and term is self.terms[0])}

    def combines_nonlinearly(self, t: float | None) -> bool:
        """Does the step at noise level t combine two or more memory deltas by a ``combine`` other than "sum"? Then
        the anchor's own pass is needed whatever its linear coefficient (each delta is measured from it)."""
        if self.combine == "sum":
            return False
        weights = self._weights(t)
        return sum(1 for term in self.terms[1:] if weights[term.name] != 0.0) >= 2

    def _combined(self, conditional: dict, baselines: list, weights: dict) -> torch.Tensor:
        """The pairwise rule with ``combine``: eps_base + combine_k(w_k' * (term_k - eps_base))."""
        anchor = conditional[self.terms[0].name]
        deltas = []
        for term, baseline in zip(self.terms[1:], baselines[1:]):
            weight = weights[term.name]
            if isinstance(weight, float) and weight == 0.0:
                continue
            eps = conditional[term.name]
            value = eps if term.alpha == 1.0 else term.alpha * eps + (1.0 - term.alpha) * baseline
            deltas.append(weight * (value - anchor))
        return anchor + combine_deltas(deltas, self.combine)

    def bind(self, conditions: dict[str, dict[str, torch.Tensor | None]]) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                    torch.Tensor]:
        """The denoiser of these conditions: conditions[name] = dict(context=(B,K,C,H,W), actions=(B,K+1,A),
        poses=(B,K+1,P) or None) per term. Every context is checked here and prepared once, at the first denoising
        step that runs its expert (a term whose pass is skipped at every level a sample visits, e.g. the base where the
        LTM's contrast cancels it, costs no preparation)."""
        skipped = self.skipped_terms()
        states, paired, gates = {}, {}, {}
        for term in self.terms:
            if term.name in skipped:
                continue
            if term.name not in conditions:
                raise ValueError(f"no conditioning given for expert term {term.name!r}")
            cond = conditions[term.name]
            context, actions, poses = cond["context"], cond["actions"], cond.get("poses")
            level = cond.get("context_level")  # (B,) or None: a U-Net's context level input
            if cond.get("gate") is not None:  # (B,) in [0, 1]: the share of its weight each sample gives the term
                gates[term.name] = cond["gate"].float().to(context.device)[:, None, None, None]
            b = context.shape[0]
            paired[term.name] = self.needs_unconditional(term)
            if paired[term.name]:
                # Conditional rows first, unconditional rows second: one batched call per step for both.
                context, actions = torch.cat([context, context]), torch.cat([actions, actions])
                poses = None if poses is None else torch.cat([poses, poses])
                level = None if level is None else torch.cat([level, level])
                drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=context.device),
                                  torch.ones(b, dtype=torch.bool, device=context.device)])
            else:
                drop = torch.zeros(b, dtype=torch.bool, device=context.device)
            extra = {} if level is None else {"context_level": level}
            states[term.name] = _Lazy(functools.partial(term.expert.prepare, context, actions, poses, drop, **extra))
        return functools.partial(self._denoise, states, paired, skipped, gates)

    def _denoise(self, states: dict, paired: dict, skipped: set, gates: dict, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        conditional: dict[str, torch.Tensor] = {}
        unconditional: dict[str, torch.Tensor] = {}
        level = float(t.max())
        weights = self._weights(level)
        if gates:  # per-sample weights: a gated term's share goes back to the anchor (pairwise) or out of the sum
            anchor = self.terms[0].name
            gated = {name: weights[name] * gate for name, gate in gates.items()}
            if self.pairwise:
                gated[anchor] = weights[anchor] + sum(weights[name] - gated[name] for name in gates)
            weights = {**weights, **gated}
        coefficients = self.conditional_coefficients(level)
        nonlinear = self.combines_nonlinearly(level)
        for term in self.terms:
            inactive = coefficients[term.name] == 0.0 and not (weights[term.name] and self.needs_unconditional(term))
            inactive = inactive and not (nonlinear and term is self.terms[0])
            if term.name in skipped or inactive:
                conditional[term.name] = torch.zeros_like(x_t)
                unconditional[term.name] = torch.zeros_like(x_t)
                continue
            state = states[term.name]
            if isinstance(state, _Lazy):  # its first step: the context is prepared now, and kept for the next steps
                state = states[term.name] = state.make()
            if paired[term.name]:
                eps = term.expert.predict_eps(state, torch.cat([x_t, x_t]), torch.cat([t, t]))
                conditional[term.name], unconditional[term.name] = eps.chunk(2)
            else:
                conditional[term.name] = term.expert.predict_eps(state, x_t, t)
            self.network_calls += 1
        baselines = [
            unconditional.get(term.name) if term.baseline == "unconditional" else conditional[term.baseline]
            for term in self.terms
        ]
        if nonlinear:
            return self._combined(conditional, baselines, weights)
        return compose_noise_predictions(
            [conditional[term.name] for term in self.terms], baselines,
            [term.alpha for term in self.terms], [weights[term.name] for term in self.terms], self.normalize,
        )


class _Lazy:
    """A context preparation not run yet (``Composer.bind``)."""

    def __init__(self, make: Callable) -> None:
        self.make = make


class ReferenceComposer(Composer):
    """The reference a plain implementation runs (as the authors' code and NWM do): at every denoising step every
    expert's context is prepared anew and every (expert, condition) pair is its own network call, the LTM's baseline
    (the base's conditional prediction) included, and no pass is skipped. Same rule, same numbers, more work: what the
    batched, cached :class:`Composer` saves (``python -m come_rl.bench world_model``; the tests run every shipped rule
    through both). Per-sample gates (``retrieval_gate``) and context levels are not supported here."""

    def bind(self, conditions: dict):
        for name, condition in conditions.items():
            if condition.get("gate") is not None or condition.get("context_level") is not None:
                raise ValueError(f"the reference composer has no per-sample gates or context levels (term {name!r})")
        return functools.partial(self._reference_denoise, conditions)

    def _predict(self, conditions: dict, term: ExpertTerm, x_t: torch.Tensor, t: torch.Tensor,
                 drop: bool) -> torch.Tensor:
        condition = conditions[term.name]
        rows = condition["context"].shape[0]
        state = term.expert.prepare(condition["context"], condition["actions"], condition.get("poses"),
                                    torch.full((rows,), drop, dtype=torch.bool, device=condition["context"].device))
        self.network_calls += 1
        return term.expert.predict_eps(state, x_t, t)

    def _reference_denoise(self, conditions: dict, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        by_name = {term.name: term for term in self.terms}
        conditional = {term.name: self._predict(conditions, term, x_t, t, False) for term in self.terms}
        baselines = []
        for term in self.terms:
            if term.alpha == 1.0:
                baselines.append(None)
            elif term.baseline == "unconditional":
                baselines.append(self._predict(conditions, term, x_t, t, True))
            else:  # the baseline expert's conditional pass, run again
                baselines.append(self._predict(conditions, by_name[term.baseline], x_t, t, False))
        weights = self._weights(float(t.max()))
        if self.combines_nonlinearly(float(t.max())):
            return self._combined(conditional, baselines, weights)
        return compose_noise_predictions([conditional[term.name] for term in self.terms], baselines,
                                         [term.alpha for term in self.terms],
                                         [weights[term.name] for term in self.terms], self.normalize)


EXPERT_ROLES = ("base", "ltm", "stm", "sltm")


@dataclass
class CompositionConfig:
    """Which experts take part and how they are weighed (paper eq. 4 and 6).

    Attributes:
        experts: the enabled terms, a subset of ("base", "ltm", "stm", "sltm"); "base" is always the anchor.
        alphas: contrast coefficient per expert (1 = plain PoE; the authors' code uses 2 for STM and LTM).
        weights: w_k per expert (1 = the paper's sum of scores).
        normalize: divide the composed eps by sum_k w_k.
        ltm_baseline: "base" shares the base model's conditional pass as the LTM's baseline p_psi(empty)(x | c)
            (paper eq. 4); "unconditional" uses the LTM's own dropped-context mode instead.
    """

    experts: list[str] = field(default_factory=lambda: ["base", "ltm"])
    alphas: dict[str, float] = field(default_factory=lambda: {"base": 1.0, "ltm": 2.0, "stm": 2.0, "sltm": 2.0})
    weights: dict[str, float] = field(default_factory=lambda: {"base": 1.0, "ltm": 1.0, "stm": 1.0, "sltm": 1.0})
    normalize: bool = True
    ltm_baseline: str = "base"
    sltm_memorizes: bool = False
    """test-time memorization of the SLTM too (paper B): a LoRA copy of the SLTM is fine-tuned on the episode (with
    its poses) by ``memorize`` like the LTM, and reset with it."""
    active_from: dict[str, float] = field(default_factory=dict)
    """per expert, the lowest noise level t at which it takes part (e.g. {"ltm": 0.9}: the LTM only where it was
    memorized); absent = always."""
    active_below: dict[str, float] = field(default_factory=dict)
    """per expert, the noise level t from which up it no longer takes part (e.g. {"stm": 0.8}: the STM only at t < 0.8,
    below the LTM's gate); absent = always."""
    retrieval_gate: dict[str, float] = field(default_factory=dict)
    """per retrieving expert (``come_rl.experts.retrieval``), the largest pose distance (position / 0.5 cell + heading
    / 45 degrees) of its retrieved view at which it takes part, sample by sample (e.g. {"sltm": 1.0}): a view seen far
    from the imagined pose says little about it; absent = always."""
    anchor: float = 0.0
    """re-anchor the rollout at revisits (not in the paper; a memory read by pose, like the retrieving SLTM's): an
    imagined frame whose pose (from the pose model) lies within ``anchor`` cells and ``anchor_degrees`` of heading of a
    memorized pose enters the context of the next steps as that memorized frame (the nearest such). The frame returned
    is still the sampled one; what drifted is replaced by what was seen. 0: off. It reads poses: a rollout from an
    episode observed without poses, or by a world model without a pose model, is not re-anchored (``last_anchored``
    says which frames were)."""
    anchor_degrees: float = 15.0
    """the heading tolerance of ``anchor`` (a view turned by 45 degrees shows another half of the scene)."""
    anchor_after: int = 0
    """with ``anchor``, the first ``anchor_after`` imagined frames of an ``imagine`` call are never re-anchored: right
    after the real context the sampled frames have not drifted yet (Memory Maze: re-anchoring costs LPIPS on frames 2-5
    of a rollout and pays from the 6th on, results/consistency_s32). Measured there, it gains nothing: the late gain
    shrinks as much as the early loss (results/consistency_tuning, session 32). 0: from the first frame."""
    anchor_skip_recent: int = 0
    """with ``anchor``, the last ``anchor_skip_recent`` observed frames are not re-anchoring candidates (a view just
    seen lies a little behind the agent on its own track, Memory Maze: up to 0.25 cell per step, and tells the rollout
    it has not moved); older views of the place stay candidates. Measured on the maze it does not remove the early cost
    of re-anchoring (older views cost as much) and loses later anchors (results/consistency_tuning, session 34).
    0: every memorized frame."""
    pairwise: bool = False
    """each memory expert adds to the base what its normalised composition with the base alone adds
    (``come_rl.composition``): alphas tuned for base + one expert keep their meaning when experts are added."""
    combine: str = "sum"
    """with ``pairwise``, how the memory experts' deltas add up, element by element: "sum" (linear), "mean", "max"
    (the largest in magnitude), "agree" (the largest where all agree in sign, else the sum); module docstring."""
    anchor_seed: float = 0.0
    """with ``anchor``, the noise level t0 in (0, 1) from which a frame whose pose matches a memorized one is sampled
    from that memorized view (SDEdit: at t0 the sample is replaced by alpha_t0 * view + sigma_t0 * its initial noise,
    and the experts denoise the rest); not in the paper. 0: off (the matched view only enters the context after)."""
    anchor_pose: bool = False
    """with ``anchor``, a re-anchored frame enters the pose track with the pose it was memorized at, not the pose model's
    estimate (a loop closure: the odometry's drift is reset where the rollout is known to be). False: the estimate."""
    anchor_appearance: float = 0.0
    """with ``anchor``, also re-anchor where the sampled frame looks like a memorized view seen near the imagined pose:
    among the memorized poses within ``anchor_search`` cells and ``anchor_search_degrees`` of heading, the view whose
    4x4-average-pooled image is nearest the sampled frame's (mean squared error of [-1, 1] pixels), when that error is
    <= ``anchor_appearance``. A wider pose window than ``anchor``'s, where appearance rules out the views of another
    part of the scene. 0: off (pose alone decides)."""
    anchor_turn: float = 0.0
    """with ``anchor``, pixels of horizontal image shift per degree of heading: a re-anchored view is turned to the
    imagined heading before it enters the context (a memorized view up to ``anchor_degrees`` off shows the scene
    shifted sideways; turning left moves the content right). Memory Maze's 64x64 camera: ~0.7 pixel per degree
    (results/consistency_tuning/turn_pixels.py). The columns the turn uncovers repeat the edge column. Measured worse
    on the maze (session 26); not in the paper. 0: off (the view enters as memorized)."""
    anchor_search: float = 1.0
    """cells: the pose window of ``anchor_appearance``."""
    anchor_search_degrees: float = 45.0
    """degrees: the pose window of ``anchor_appearance``."""

    def __post_init__(self) -> None:
        unknown = set(self.experts) - set(EXPERT_ROLES)
        if unknown:
            raise ValueError(f"unknown experts {sorted(unknown)}; choose from {EXPERT_ROLES}")
        if "base" not in self.experts:
            raise ValueError("the composition needs the base expert (it anchors the LTM's baseline)")
        for role in set(self.active_from) | set(self.active_below):
            low, high = self.active_from.get(role, 0.0), self.active_below.get(role, float("inf"))
            if role not in EXPERT_ROLES or not 0.0 <= low < high:
                raise ValueError(f"gate of {role!r}: need a known expert and 0 <= active_from < active_below, got "
                                 f"active_from={low}, active_below={high} (it would never take part)")
        if not (self.anchor >= 0.0 and math.isfinite(self.anchor)):
            raise ValueError(f"anchor must be a distance in cells >= 0 (0: off), got {self.anchor}")
        if not 0.0 < self.anchor_degrees <= 180.0:
            raise ValueError(f"anchor_degrees must be in (0, 180], got {self.anchor_degrees}")
        if isinstance(self.anchor_after, bool) or not isinstance(self.anchor_after, int) or self.anchor_after < 0:
            raise ValueError(f"anchor_after must be a number of imagined frames >= 0 (0: re-anchor from the first), got "
                             f"{self.anchor_after!r}")
        if (isinstance(self.anchor_skip_recent, bool) or not isinstance(self.anchor_skip_recent, int)
                or self.anchor_skip_recent < 0):
            raise ValueError(f"anchor_skip_recent must be a number of observed frames >= 0 (0: every memorized frame is "
                             f"a candidate), got {self.anchor_skip_recent!r}")
        if self.combine not in COMBINE_MODES or (self.combine != "sum" and not self.pairwise):
            raise ValueError(f"combine must be one of {COMBINE_MODES} (other than sum only with pairwise: true), got "
                             f"{self.combine!r} with pairwise={self.pairwise}")
        if not 0.0 <= self.anchor_seed < 1.0 or (self.anchor_seed > 0 and not self.anchor > 0):
            raise ValueError(f"anchor_seed must be a noise level in [0, 1) (0: off) and needs anchor > 0, got "
                             f"anchor_seed={self.anchor_seed}, anchor={self.anchor}")
        if not (self.anchor_appearance >= 0.0 and math.isfinite(self.anchor_appearance)) or (
                self.anchor_appearance > 0 and not self.anchor > 0):
            raise ValueError(f"anchor_appearance must be a mean squared error >= 0 (0: off) and needs anchor > 0, got "
                             f"anchor_appearance={self.anchor_appearance}, anchor={self.anchor}")
        if not (self.anchor_turn >= 0.0 and math.isfinite(self.anchor_turn)) or (self.anchor_turn > 0
                                                                               and not self.anchor > 0):
            raise ValueError(f"anchor_turn must be pixels per degree >= 0 (0: off) and needs anchor > 0, got "
                             f"anchor_turn={self.anchor_turn}, anchor={self.anchor}")
        if self.anchor_pose and not self.anchor > 0:
            raise ValueError("anchor_pose needs anchor > 0 (it sets the pose of a re-anchored frame)")
        if not (self.anchor_search > 0 and math.isfinite(self.anchor_search)) or not 0.0 < self.anchor_search_degrees <= 180.0:
            raise ValueError(f"anchor_search must be > 0 cells and anchor_search_degrees in (0, 180], got "
                             f"{self.anchor_search}, {self.anchor_search_degrees}")
        for role, distance in self.retrieval_gate.items():
            if role not in EXPERT_ROLES or role == "base" or not distance > 0:
                raise ValueError(f"retrieval_gate of {role!r}: need a memory expert and a distance > 0, got {distance}")


def build_composer(config: CompositionConfig, experts: dict[str, DiffusionExpert],
                   reference: bool = False) -> Composer:
    """The :class:`Composer` of ``config`` over ``experts`` (role -> expert): the base first (the pairwise anchor),
    the LTM's baseline per ``config.ltm_baseline``, every other expert against its own unconditional mode.
    ``reference=True``: the :class:`ReferenceComposer` of the same rule (every pass run, nothing shared)."""
    terms = []
    for role in ["base", *(r for r in config.experts if r != "base")]:
        baseline = config.ltm_baseline if role == "ltm" else "unconditional"
        terms.append(ExpertTerm(role, experts[role], config.alphas.get(role, 1.0), config.weights.get(role, 1.0),
                                baseline, config.active_from.get(role, 0.0),
                                config.active_below.get(role, float("inf"))))
    return (ReferenceComposer if reference else Composer)(terms, normalize=config.normalize, pairwise=config.pairwise,
                                                          combine=config.combine)


COMPOSITIONS_CONF_DIR = Path(__file__).resolve().parent / "conf" / "compositions"


@dataclass(frozen=True)
class NamedCompositions:
    """Named rules of one study, written once in ``come_rl/conf/compositions/<name>.yaml``: ``rules`` (name ->
    :class:`CompositionConfig` fields), ``sets`` (a word -> names), and the names of the shipped rule and the
    no-memory rule."""

    source: Path
    rules: dict[str, dict]
    sets: dict[str, list[str]]
    shipped: str
    no_memory: str

    def config(self, name: str) -> CompositionConfig:
        return CompositionConfig(**self.rules[name])

    def resolve(self, spec: str) -> list[str]:
        """A set name, one rule name, or names separated by ";" (names may contain commas) -> rule names."""
        if spec in self.sets:
            names = list(self.sets[spec])
        elif spec in self.rules:
            names = [spec]
        else:
            names = [name.strip() for name in spec.split(";") if name.strip()]
        unknown = [name for name in names if name not in self.rules]
        if unknown or not names:
            raise ValueError(f"unknown compositions {unknown}; use a set ({', '.join(self.sets)}) or names from "
                             f"{list(self.rules)} ({self.source})")
        return names


def load_named_compositions(name: str | Path) -> NamedCompositions:
    """``come_rl/conf/compositions/<name>.yaml`` (or a path to such a file), every rule checked by building its
    :class:`CompositionConfig`, every set and the shipped / no-memory names checked against the rules."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else COMPOSITIONS_CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in COMPOSITIONS_CONF_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no composition file {path}; named sets: {known}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("compositions"), dict):
        raise ValueError(f"{path} must hold a mapping `compositions: {{name: {{CompositionConfig fields}}}}`")
    rules = {str(key): dict(value) for key, value in spec["compositions"].items()}
    for key, value in rules.items():
        try:
            CompositionConfig(**value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: composition {key!r} is not a valid CompositionConfig: {error}") from error
    sets = {str(key): list(value) for key, value in (spec.get("sets") or {}).items()}
    named = [*(n for names in sets.values() for n in names), spec.get("shipped", ""), spec.get("no_memory", "")]
    unknown = sorted({n for n in named if n and n not in rules})
    if unknown:
        raise ValueError(f"{path}: sets / shipped / no_memory name compositions it does not define: {unknown}")
    return NamedCompositions(path, rules, sets, str(spec.get("shipped", "")), str(spec.get("no_memory", "")))
