"""Attack names as users write them, resolved into attack specifications.

    fgsm                      FGSM at eps_data
    pgd-20                    L-inf PGD, 20 steps of eps/4 (2/255 at 8/255: constant-perturbation paper, section 3)
    pgd-l2-20                 L2 PGD, 20 steps of 2.5 eps / steps, eps = the L2 budget
    eot-pgd, eot-pgd-20       PGD-20 with EOT over 20 stochastic passes (AutoAttack's 'rand' S)
    apgd-ce, apgd-dlr         APGD (Croce & Hein 2020), 100 iterations
    apgd-rand                 AutoAttack's protocol for randomized defenses: APGD-CE then
                              APGD-DLR, 100 iterations, 20 EOT samples, 1 restart
    smoothed-pgd[-N]:sigma=S  PGD-N (default 20) on the model under the certification noise,
                              gradient averaged over n0 = 100 noise draws (STN section 6.2)

Any name takes overrides after a colon: ``pgd-20:eot_samples=80,restarts=5``.
A name may expand to several attacks (``apgd-rand``).  Unknown names and
invalid hyperparameters raise ValueError naming the valid choices.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

from robust.attacks import create_attack

#: AutoAttack's EOT sample count for randomized defenses (Croce & Hein 2020, 'rand' version).
RAND_EOT_SAMPLES = 20
#: The default L2 budget: 0.5, the usual CIFAR-10 L2 threat model (Croce & Hein 2020).
DEFAULT_L2_EPS = 0.5

SUITE_NAMES = ("fgsm", "pgd-N", "pgd-l2-N", "eot-pgd[-N]", "apgd-ce", "apgd-dlr", "apgd-rand",
               "smoothed-pgd[-N]:sigma=S")


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack: registry name, hyperparameters, and the label used in results.

    ``eps`` None means the dataset's budget (eps_data for L-inf, ``DEFAULT_L2_EPS`` for L2).
    ``step_fraction`` sets the step size as a fraction of eps.
    """

    label: str
    attack: str
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> str:
        return self.params.get("norm", "linf")

    @property
    def gradient_based(self) -> bool:
        return True  # every attack of the suite so far follows gradients

    def eps(self, eps_data: float) -> float:
        if "eps" in self.params:
            return float(self.params["eps"])
        return DEFAULT_L2_EPS if self.norm == "l2" else float(eps_data)

    def with_params(self, **params: Any) -> "AttackSpec":
        return AttackSpec(self.label, self.attack, {**self.params, **params})

    def build(self, eps_data: float, seed: int):
        params = dict(self.params)
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
    (r"apgd-dlr", lambda: [AttackSpec("apgd-dlr", "apgd-dlr", {"steps": 100})]),
    (r"apgd-rand", lambda: [
        AttackSpec("apgd-ce-rand", "apgd-ce", {"steps": 100, "restarts": 1, "eot_samples": RAND_EOT_SAMPLES}),
        AttackSpec("apgd-dlr-rand", "apgd-dlr", {"steps": 100, "restarts": 1, "eot_samples": RAND_EOT_SAMPLES}),
    ]),
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


def parse_attacks(names: List[str], eps_data: float) -> List[AttackSpec]:
    """Resolve and validate a list of attack names (each built once, cheaply)."""
    specs = [spec for name in names for spec in parse_attack(name)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attack list repeats an attack: {', '.join(labels)}")
    for spec in specs:
        if spec.eps(eps_data) < 0:
            raise ValueError(f"attack {spec.label}: eps must be >= 0, got {spec.eps(eps_data)}")
        try:
            spec.build(eps_data, seed=0)
        except TypeError as err:
            raise ValueError(f"attack {spec.label}: {err}") from None
    return specs
