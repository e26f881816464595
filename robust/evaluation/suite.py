"""Attack names as users write them, resolved into attack specifications.

    fgsm                      FGSM at eps_data
    pgd-20                    L-inf PGD, 20 steps of eps/4 (2/255 at 8/255: constant-perturbation paper, section 3)
    pgd-l2-20                 L2 PGD, 20 steps of 2.5 eps / steps, eps = the L2 budget
    eot-pgd, eot-pgd-20       PGD-20 with EOT over 20 stochastic passes (AutoAttack's 'rand' S)
    apgd-ce, apgd-dlr         APGD (Croce & Hein 2020), 100 iterations
    apgd-rand                 AutoAttack's protocol for randomized defenses: APGD-CE then
                              APGD-DLR, 100 iterations, 20 EOT samples, 1 restart
    smoothed-pgd[-N]:sigma=S  PGD-N (default 20) on the model under the certification noise,
                              gradient averaged over n0 = 100 noise draws (STN section 6.2); on a
                              classifier that already adds noise (stn's deployed one) it attacks
                              that classifier as it is, and S must be its sigma
    few-pixel-D               black-box: differential evolution changing at most D pixels
                              (norm l0, eps = D; population 400, 75 iterations: Learn2Perturb A.5)
    localsearch               black-box: LocalSearch (Narodytska & Kasiviswanathan 2017, the SDR
                              paper's attack), unbounded (norm l0, eps = inf)
    localsearch-linf          black-box: LocalSearch kept inside the L-inf ball of eps_data
    boundary                  decision-based Boundary attack (Brendel et al. 2018), success at
                              L2 distance <= eps (default 0.5); boundary-min: unbounded, minimal L2
    apgd-t                    APGD on the targeted DLR loss, 9 target classes, 100 iterations
    fab-t, fab-t-l2           targeted FAB (Croce & Hein 2020), 9 targets, 100 iterations, within eps
    square                    Square Attack, L-inf, 5,000 queries, score-based (black-box)
    autoattack                AutoAttack's standard set, in its order: apgd-ce, apgd-t, fab-t, square
    cw-l2[:kappa=K]           Carlini-Wagner L2, Adam lr 5e-4, 1000 iterations, 9 binary-search
                              steps over c in [1e-3, 1e10] (Learn2Perturb 4.2), minimal-norm
    deepfool                  DeepFool L2 multi-class, overshoot 0.02, 50 iterations, minimal-norm
    fgsm-grow                 FGSM with eps grown on a grid of 1000 up to 1 until the label
                              changes (Foolbox's FGSM, SDR section 2.1), minimal-norm (L-inf)
    fab-t-min, fab-t-min-l2   FAB-T returning the closest adversarial point, minimal-norm

Minimal-norm attacks (``AttackSpec.minimal_norm``) have no budget: they return
the closest adversarial point they find (the clean input where they fail).
Their rows hold the prediction on that point, ``eps`` = inf, and ``distance``
= its size in the attack's norm (inf where the attack failed); they run on the
examples classified correctly when clean, whatever the protocol, and stay out
of the running worst case (``robust``).  The summary reports their median
distance and their success rate at given budgets.

``autoattack`` runs its four attacks in AutoAttack's order under either
protocol.  With ``--protocol cascade`` (AutoAttack's) each attack only sees the
examples the earlier ones left robust; with ``independent`` each attack runs
on every example, costs more, and reports its own accuracy, while the worst
case over the four (the ``robust`` column of the last one) is still
AutoAttack's robust accuracy.  Overrides apply to all four
(``autoattack:eot_samples=20`` is the EOT version for randomized defenses;
Square then averages 20 passes per query).

Black-box attacks (square, few-pixel, localsearch, boundary) only query the
model's outputs and get no EOT (``gradient_based`` is False); on a stochastic
model each query is answered from ``query_draws`` draws (default 8) under the
verdict's rule, and the rows count the queries spent (``queries``); Square's
``eot_samples`` is the same setting.  Every attack's rows are judged alike, on
``votes`` fresh draws (the verdict).

Expensive attacks take their own example cap: ``few-pixel-1:max_examples=100``
attacks (and writes rows for) only the first 100 evaluated examples.

Any name takes overrides after a colon: ``pgd-20:eot_samples=80,restarts=5``.
A name may expand to several attacks (``apgd-rand``).  Unknown names and
invalid hyperparameters raise ValueError naming the valid choices.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from robust.attacks import create_attack

#: AutoAttack's EOT sample count for randomized defenses (Croce & Hein 2020, 'rand' version).
RAND_EOT_SAMPLES = 20
#: The default L2 budget: 0.5, the usual CIFAR-10 L2 threat model (Croce & Hein 2020).
DEFAULT_L2_EPS = 0.5

SUITE_NAMES = ("fgsm", "pgd-N", "pgd-l2-N", "eot-pgd[-N]", "apgd-ce", "apgd-dlr", "apgd-rand",
               "smoothed-pgd[-N]:sigma=S", "few-pixel-D", "localsearch", "localsearch-linf", "boundary",
               "boundary-min", "apgd-t", "fab-t", "fab-t-l2", "square", "autoattack", "cw-l2[:kappa=K]",
               "deepfool", "fgsm-grow", "fab-t-min", "fab-t-min-l2")
#: Registry names of the attacks that search the smallest adversarial perturbation, unbounded.
MINIMAL_NORM_ATTACKS = frozenset({"cw-l2", "deepfool", "fgsm-grow"})
#: The norm of attacks whose registry entry has no ``norm`` argument (default: linf).
ATTACK_NORMS = {"cw-l2": "l2", "deepfool": "l2"}
#: Registry names of attacks that query only the model's outputs (no gradients, so no EOT).
BLACK_BOX_ATTACKS = frozenset({"few-pixel", "local-search", "boundary", "square"})


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack: registry name, hyperparameters, and the label used in results.

    ``eps`` None means the dataset's budget (eps_data for L-inf, ``DEFAULT_L2_EPS`` for L2);
    minimal-norm attacks have none (eps = inf).
    ``step_fraction`` sets the step size as a fraction of eps.
    """

    label: str
    attack: str
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> str:
        return self.params.get("norm", ATTACK_NORMS.get(self.attack, "linf"))

    @property
    def gradient_based(self) -> bool:
        return self.attack not in BLACK_BOX_ATTACKS

    @property
    def max_examples(self) -> Optional[int]:
        """The attack's own cap: only examples at positions < cap are attacked (None: all)."""
        cap = self.params.get("max_examples")
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ValueError(f"attack {self.label}: max_examples must be an integer >= 1, got {cap!r}")
        return cap

    @property
    def minimal_norm(self) -> bool:
        """True for unbounded attacks that return the closest adversarial point they find."""
        return self.attack in MINIMAL_NORM_ATTACKS or bool(self.params.get("minimal", False))

    def eps(self, eps_data: float) -> float:
        if self.minimal_norm:
            return math.inf
        if "eps" in self.params:
            return float(self.params["eps"])
        return DEFAULT_L2_EPS if self.norm == "l2" else float(eps_data)

    def with_params(self, **params: Any) -> "AttackSpec":
        return AttackSpec(self.label, self.attack, {**self.params, **params})

    def build(self, eps_data: float, seed: int):
        params = dict(self.params)
        params.pop("max_examples", None)  # the protocol's business, not the attack's
        if self.minimal_norm:
            if "eps" in params:
                raise ValueError(f"attack {self.label} is minimal-norm (unbounded): it takes no eps")
            return create_attack(self.attack, seed=seed, **params)
        params.pop("eps", None)
        eps = self.eps(eps_data)
        fraction = params.pop("step_fraction", None)
        if fraction is not None:
            params["step_size"] = fraction * eps
        return create_attack(self.attack, eps=eps, seed=seed, **params)


def _steps(text: str) -> int:
    steps = int(text)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def _pixels(text: str) -> int:
    pixels = int(text)
    if pixels < 1:
        raise ValueError(f"few-pixel-D: D (pixels) must be >= 1, got {pixels}")
    return pixels


_PATTERNS: List[tuple[str, Callable[..., List[AttackSpec]]]] = [
    (r"fgsm", lambda: [AttackSpec("fgsm", "fgsm")]),
    (r"pgd-(-?\d+)", lambda n: [AttackSpec(f"pgd-{_steps(n)}", "pgd",
                                           {"steps": _steps(n), "step_fraction": 0.25})]),
    (r"pgd-l2-(-?\d+)", lambda n: [AttackSpec(f"pgd-l2-{_steps(n)}", "pgd",
                                              {"steps": _steps(n), "norm": "l2"})]),
    (r"eot-pgd(?:-(-?\d+))?", lambda n=None: [AttackSpec(
        f"eot-pgd-{_steps(n or 20)}", "pgd",
        {"steps": _steps(n or 20), "step_fraction": 0.25, "eot_samples": RAND_EOT_SAMPLES})]),
    (r"smoothed-pgd(?:-(-?\d+))?", lambda n=None: [AttackSpec(
        f"smoothed-pgd-{_steps(n or 20)}", "smoothed-pgd", {"steps": _steps(n or 20), "step_fraction": 0.25})]),
    (r"apgd-ce", lambda: [AttackSpec("apgd-ce", "apgd-ce", {"steps": 100})]),
    (r"few-pixel-(-?\d+)", lambda n: [AttackSpec(f"few-pixel-{_pixels(n)}", "few-pixel",
                                                  {"eps": _pixels(n), "norm": "l0"})]),
    (r"localsearch", lambda: [AttackSpec("localsearch", "local-search", {"eps": math.inf, "norm": "l0"})]),
    (r"localsearch-linf", lambda: [AttackSpec("localsearch-linf", "local-search", {"norm": "linf"})]),
    (r"boundary", lambda: [AttackSpec("boundary", "boundary", {"norm": "l2"})]),
    (r"boundary-min", lambda: [AttackSpec("boundary-min", "boundary", {"norm": "l2", "minimal": True})]),
    (r"apgd-dlr", lambda: [AttackSpec("apgd-dlr", "apgd-dlr", {"steps": 100})]),
    (r"apgd-rand", lambda: [
        AttackSpec("apgd-ce-rand", "apgd-ce", {"steps": 100, "restarts": 1, "eot_samples": RAND_EOT_SAMPLES}),
        AttackSpec("apgd-dlr-rand", "apgd-dlr", {"steps": 100, "restarts": 1, "eot_samples": RAND_EOT_SAMPLES}),
    ]),
    (r"apgd-t", lambda: [AttackSpec("apgd-t", "apgd-t", {"steps": 100})]),
    (r"fab-t(-l2)?", lambda l2=None: [AttackSpec(f"fab-t{l2 or ''}", "fab-t",
                                                 {"steps": 100, **({"norm": "l2"} if l2 else {})})]),
    (r"fab-t-min(-l2)?", lambda l2=None: [AttackSpec(f"fab-t-min{l2 or ''}", "fab-t", {
        "steps": 100, "minimal": True, **({"norm": "l2"} if l2 else {})})]),
    (r"square", lambda: [AttackSpec("square", "square", {"queries": 5000})]),
    # AutoAttack's standard version (Croce & Hein 2020): its four attacks, in its order.
    (r"autoattack", lambda: [AttackSpec("apgd-ce", "apgd-ce", {"steps": 100}),
                             AttackSpec("apgd-t", "apgd-t", {"steps": 100}),
                             AttackSpec("fab-t", "fab-t", {"steps": 100}),
                             AttackSpec("square", "square", {"queries": 5000})]),
    (r"cw-l2", lambda: [AttackSpec("cw-l2", "cw-l2")]),
    (r"deepfool", lambda: [AttackSpec("deepfool", "deepfool")]),
    (r"fgsm-grow", lambda: [AttackSpec("fgsm-grow", "fgsm-grow")]),
]


def _overrides(text: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"attack override {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_attack(name: str) -> List[AttackSpec]:
    """The attack specifications that ``name`` stands for (see the module docstring)."""
    base, _, extra = name.strip().partition(":")
    for pattern, make in _PATTERNS:
        match = re.fullmatch(pattern, base)
        if match:
            specs = make(*[g for g in match.groups() if g is not None])
            overrides = _overrides(extra)
            if overrides:
                suffix = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
                specs = [AttackSpec(f"{s.label}:{suffix}", s.attack, {**s.params, **overrides})
                         for s in specs]
            return specs
    raise ValueError(f"unknown attack {name!r}; valid choices: {', '.join(SUITE_NAMES)}")


def spec_of_label(label: str) -> Optional[AttackSpec]:
    """The specification a results label was written by, when the label parses back to it
    (every single-attack name does; expansions like apgd-rand's labels do not: None)."""
    try:
        specs = parse_attack(label)
    except ValueError:
        return None
    return next((s for s in specs if s.label == label), None)


def is_minimal_norm(label: str) -> bool:
    """Whether a results label belongs to a minimal-norm (unbounded) attack."""
    spec = spec_of_label(label)
    return spec is not None and spec.minimal_norm


def parse_attacks(names: List[str], eps_data: float) -> List[AttackSpec]:
    """Resolve and validate a list of attack names (each built once, cheaply)."""
    specs = [spec for name in names for spec in parse_attack(name)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attack list repeats an attack: {', '.join(labels)}")
    for spec in specs:
        if spec.eps(eps_data) < 0:
            raise ValueError(f"attack {spec.label}: eps must be >= 0, got {spec.eps(eps_data)}")
        _ = spec.max_examples  # validates the cap
        try:
            spec.build(eps_data, seed=0)
        except TypeError as err:
            raise ValueError(f"attack {spec.label}: {err}") from None
    return specs
