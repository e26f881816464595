#!/usr/bin/env python
"""Attack throughput on CPU: our PGD / EOT-PGD against torchattacks as the reference.

A benchmark, not a test: pytest never collects it (``testpaths = ["tests"]`` and
the name does not start with ``test_``), and torchattacks is not a dependency of
the project.  Install the reference into the venv only for this script, without
its pinned dependencies (it pins an old ``requests``)::

    .venv/bin/pip install --no-deps torchattacks
    .venv/bin/python benchmarks/bench_attacks.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_attacks.py --quick    # smoke check, well under a minute
    .venv/bin/python benchmarks/bench_attacks.py --markdown # the same table as Markdown

Both sides attack the same model (eval mode, random weights from
``torch.manual_seed(0)``: speed does not depend on training) on the same inputs
(``torch.rand`` with a fixed seed, random labels), with eps = 8/255 and step
2/255 in L-inf, random start on both sides.  Each configuration gets one warm-up
call per side, then ``--runs`` repetitions; within a repetition ours and the
reference run back to back (the order alternates between repetitions) so that
machine noise hits both, and each full attack call is timed with
``time.perf_counter()``.  Reported: the median time as images per second;
ratio = ours / reference of those (higher is better for us), judged against the
target; and "per-run range", the smallest and largest ratio of the two
back-to-back calls of one repetition, which shows how much of a miss is noise.
Before timing, both outputs are checked to lie in [0, 1] and inside the eps
ball, so the two sides solve the same problem.

The reference for EOT is ``torchattacks.EOTPGD``, which runs ``eot_iter`` separate
forward/backward passes over the batch per step (the per-image EOT loop of
Learn2Perturb's code at batch 1); ours stacks the S copies into passes of at most
``eot_chunk`` inputs (``None``: the per-device default, 64 on CPU).  Rows marked
"tuned" use the explicit chunk of :data:`TUNED_EOT_CHUNK` (the best of
``--chunk-sweep`` on a 2-core CPU); their pass/fail is informative, the targets
are judged on the default rows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from robust.attacks import create_attack  # noqa: E402
from robust.attacks.base import DEFAULT_EOT_CHUNK  # noqa: E402
from robust.models import create_model  # noqa: E402

EPS = 8 / 255
STEP = 2 / 255
PGD_STEPS = 20
EOT_SAMPLES = 20
#: Pinned models: name -> (in_channels, image_size); 10 classes each.
MODELS = {"resnet20": (3, 32), "small-cnn": (1, 8)}
#: Explicit eot_chunk of the "tuned" rows, per model, from ``--chunk-sweep`` on a
#: 2-core CPU (2 threads).  ResNet-20 EOT-PGD was fastest with passes of 24-32
#: inputs at batch 4 and 8 (64: about 5-10% slower, 160: 15-30% slower, as its
#: activations outgrow the cache); the tiny small-cnn keeps gaining up to ~512
#: inputs per pass and slows past ~1000.
TUNED_EOT_CHUNK = {"resnet20": 32, "small-cnn": 512}


@dataclass(frozen=True)
class Config:
    model: str
    batch: int
    samples: int       # S: EOT samples (1 = plain PGD)
    steps: int
    target: float      # required ratio ours / reference
    eot_chunk: Optional[int] = None   # None: the per-device default

    @property
    def label(self) -> str:
        if self.samples == 1:
            return "PGD"
        return "EOT-PGD" + (f" (tuned chunk {self.eot_chunk})" if self.eot_chunk else "")


def copies_per_pass(batch: int, chunk: Optional[int]) -> int:
    """How many of the S copies of a batch our EOT stacks into one forward pass (CPU)."""
    chunk = DEFAULT_EOT_CHUNK["cpu"] if chunk is None else chunk
    return max(1, min(EOT_SAMPLES, chunk // batch))


def configs(quick: bool, models: Sequence[str] = tuple(MODELS)) -> List[Config]:
    """The pinned grid.  EOT at batch 128 runs 1 step on ResNet-20 (20 forward/backward
    passes of 128 images, ~10 s per call on 2 cores); the time per step is constant,
    so the ratio does not depend on the number of steps.  A tuned-chunk row is left
    out where it would stack exactly as the default does (same copies per pass)."""
    out: List[Config] = []
    for model in (("small-cnn",) if quick else models):
        for b in ((32,) if quick else (128, 32)):
            out.append(Config(model, b, 1, PGD_STEPS, 0.95))
        eot_batches = [(128, 1 if model == "resnet20" else 5, 1.0)]
        eot_batches += [(b, 5, 1.5) for b in ((1, 8) if quick else (1, 2, 4, 8))]
        for chunk in (None, TUNED_EOT_CHUNK[model]):
            for b, steps, target in eot_batches:
                same_as_default = copies_per_pass(b, chunk) == copies_per_pass(b, None)
                if chunk is not None and (quick or same_as_default):
                    continue
                out.append(Config(model, b, EOT_SAMPLES, steps, target, chunk))
    return out


def build_model(name: str) -> nn.Module:
    channels, size = MODELS[name]
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=channels, image_size=size).eval()


def make_inputs(name: str, batch: int) -> tuple[Tensor, Tensor]:
    channels, size = MODELS[name]
    g = torch.Generator().manual_seed(1234 + batch)
    x = torch.rand(batch, channels, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, y


def ours(cfg: Config) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    attack = create_attack("pgd", eps=EPS, steps=cfg.steps, step_size=STEP, random_start=True,
                           eot_samples=cfg.samples, eot_chunk=cfg.eot_chunk)
    return lambda model, x, y: attack(model, x, y)


def reference(cfg: Config, model: nn.Module) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    import torchattacks

    if cfg.samples == 1:
        attack = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=cfg.steps, random_start=True)
    else:
        attack = torchattacks.EOTPGD(model, eps=EPS, alpha=STEP, steps=cfg.steps,
                                     eot_iter=cfg.samples, random_start=True)
    return lambda _model, x, y: attack(x, y)


def check_in_ball(name: str, x_adv: Tensor, x: Tensor) -> None:
    """Both sides must return points of the same threat model, or the timing compares
    different problems."""
    assert x_adv.shape == x.shape, f"{name}: shape {tuple(x_adv.shape)} != {tuple(x.shape)}"
    linf = (x_adv - x).abs().max().item()
    assert linf <= EPS + 1e-6, f"{name}: ||x_adv - x||_inf = {linf:.6f} > eps = {EPS:.6f}"
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0, f"{name}: x_adv outside [0, 1]"
    assert linf > 0.0, f"{name}: no perturbation at all"


def timed(fn: Callable[[nn.Module, Tensor, Tensor], Tensor], model: nn.Module,
          x: Tensor, y: Tensor) -> float:
    start = time.perf_counter()
    fn(model, x, y)
    return time.perf_counter() - start


@dataclass
class Row:
    cfg: Config
    ours_ips: float
    ref_ips: float
    paired: List[float]   # per repetition: reference time / our time (back-to-back calls)

    @property
    def ratio(self) -> float:
        return self.ours_ips / self.ref_ips

    @property
    def passed(self) -> bool:
        return self.ratio >= self.cfg.target


def run_config(cfg: Config, runs: int) -> Row:
    model = build_model(cfg.model)
    x, y = make_inputs(cfg.model, cfg.batch)
    mine, ref = ours(cfg), reference(cfg, model)
    # Warm-up (one call each), which is also the fairness check.
    check_in_ball("ours", mine(model, x, y), x)
    check_in_ball("torchattacks", ref(model, x, y), x)
    t_ours: List[float] = []
    t_ref: List[float] = []
    for r in range(runs):
        if r % 2 == 0:
            t_ours.append(timed(mine, model, x, y))
            t_ref.append(timed(ref, model, x, y))
        else:
            t_ref.append(timed(ref, model, x, y))
            t_ours.append(timed(mine, model, x, y))
    paired = [r / o for o, r in zip(t_ours, t_ref)]
    return Row(cfg, cfg.batch / statistics.median(t_ours), cfg.batch / statistics.median(t_ref), paired)


HEADER = ("model", "attack", "batch", "S", "steps", "ours img/s", "ref img/s", "ratio",
          "per-run range", "target", "result")


def cells(row: Row) -> Sequence[str]:
    c = row.cfg
    return (c.model, c.label, str(c.batch), str(c.samples), str(c.steps), f"{row.ours_ips:.1f}",
            f"{row.ref_ips:.1f}", f"{row.ratio:.2f}x",
            f"{min(row.paired):.2f}-{max(row.paired):.2f}", f">= {c.target:.2f}x",
            "pass" if row.passed else "FAIL")


def format_table(rows: Sequence[Row], markdown: bool) -> str:
    body = [cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADER))) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    fmt = lambda cols: "  ".join(  # noqa: E731
        col.ljust(w) if i < 2 else col.rjust(w) for i, (col, w) in enumerate(zip(cols, widths)))
    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def chunk_sweep(runs: int, chunks: Sequence[int], models: Sequence[str]) -> None:
    """Our EOT-PGD only, across explicit eot_chunk values: how TUNED_EOT_CHUNK was chosen.
    Chunks that stack the same number of copies per pass are timed once."""
    print(f"chunk sweep: our EOT-PGD, S={EOT_SAMPLES}, median img/s of {runs} runs "
          "(copies per pass in brackets)")
    print("model      batch  steps  " + "  ".join(f"{c:>11}" for c in chunks))
    for model_name in models:
        model = build_model(model_name)
        for batch in (1, 2, 4, 8, 128):
            steps = 1 if (model_name == "resnet20" and batch == 128) else 5
            x, y = make_inputs(model_name, batch)
            measured: dict[int, float] = {}
            line = []
            for chunk in chunks:
                k = copies_per_pass(batch, chunk)
                if k not in measured:
                    fn = ours(Config(model_name, batch, EOT_SAMPLES, steps, 0.0, chunk))
                    fn(model, x, y)
                    measured[k] = batch / statistics.median(timed(fn, model, x, y) for _ in range(runs))
                line.append(f"{measured[k]:7.1f} ({k:>2})")
            print(f"{model_name:<10} {batch:>5}  {steps:>5}  " + "  ".join(line), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--runs", type=int, default=5, help="timed repetitions per side (default 5)")
    parser.add_argument("--quick", action="store_true", help="a few small configurations only")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--chunk-sweep", type=int, nargs="*", metavar="CHUNK",
                        help="time our EOT-PGD across these eot_chunk values instead")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=tuple(MODELS),
                        help="models to run (default: both)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.runs < 1:
        parser.error("--threads and --runs must be >= 1")
    torch.set_num_threads(args.threads)

    if args.chunk_sweep is not None:
        chunk_sweep(args.runs, args.chunk_sweep or [8, 16, 32, 64, 128, 256, 512],
                    args.models)
        return 0
    try:
        import torchattacks
    except ImportError as exc:
        print(f"torchattacks is not importable ({exc}); install it for this benchmark only with\n"
              "    .venv/bin/pip install --no-deps torchattacks", file=sys.stderr)
        return 2

    print(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
          f"threads {torch.get_num_threads()}, nproc {os.cpu_count()}, runs {args.runs} "
          f"(+1 warm-up), eps 8/255, step 2/255, default eot_chunk on CPU "
          f"{DEFAULT_EOT_CHUNK['cpu']}", file=sys.stderr)
    rows: List[Row] = []
    for cfg in configs(args.quick, args.models):
        start = time.perf_counter()
        row = run_config(cfg, args.runs)
        rows.append(row)
        print(f"  {cfg.model} {cfg.label} batch {cfg.batch}: ratio {row.ratio:.2f}x "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
