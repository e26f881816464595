"""The deterministic evaluation whose rows are pinned in ``tests/golden/``.

Run as a script to (re)write the golden file; the test ``test_golden_rows.py``
evaluates the same job and compares.  The file was written with the code from
before the stochastic-model verdict rules (issue 14), so the test shows that
those rules leave every deterministic row as it was.  The cascade's check subset
(every bounded attack on the first few examples of a batch, added with those
rules so that flags can compare attacks on the same examples) attacks more by
design: it is off here (``check_examples=0``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "deterministic_rows.json"
#: Every attack family, at budgets small enough for CI (a few seconds in all).
ATTACKS = ["fgsm", "pgd-5", "pgd-l2-5", "eot-pgd-3:eot_samples=2", "apgd-ce:steps=10,restarts=2",
           "apgd-dlr:steps=10", "apgd-t:steps=5,targets=3", "fab-t:steps=5,targets=2",
           "square:queries=60", "cw-l2:steps=20,search_steps=2", "deepfool:steps=10", "fgsm-grow:steps=50",
           "few-pixel-1:population=8,iterations=3,max_examples=6", "localsearch:rounds=3",
           "localsearch-linf:rounds=3", "boundary:steps=10,init_tries=10", "fab-t-min:steps=5,targets=2"]
#: Columns that existed before the verdict rules; each must be unchanged.
COLUMNS = ("example", "label", "prediction", "correct", "vote_prediction", "vote_correct", "attacked",
           "robust", "eps", "eot_samples", "stochastic", "distance")


def model_and_split():
    from robust.data import create_dataset
    from robust.models import create_model

    digits = create_dataset("digits")
    torch.manual_seed(3)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8,
                         mean=digits.mean, std=digits.std)
    # a few plain SGD steps: confident enough that the attacks have something to do
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _ = digits.train.batch(torch.arange(256))
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), digits


def evaluate(protocol: str):
    from robust.evaluation.protocol import evaluate_shard
    from robust.evaluation.suite import parse_attacks

    torch.set_num_threads(1)  # summation order fixed: rows bit-identical across machines' thread counts
    model, digits = model_and_split()
    specs = parse_attacks(ATTACKS, digits.eps)
    out = evaluate_shard(model, digits.test, range(0, 24), specs, digits.eps, torch.device("cpu"), seed=5,
                         batch_size=12, protocol=protocol, large_eps_examples=2, check_examples=0)
    return {label: {c: cols[c] for c in COLUMNS} for label, cols in out.items()}


if __name__ == "__main__":
    rows = {p: evaluate(p) for p in ("independent", "cascade")}
    GOLDEN.write_text(json.dumps(rows, sort_keys=True, allow_nan=True))
    print(f"wrote {GOLDEN}", file=sys.stderr)
