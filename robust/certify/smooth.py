"""Predict and certify with a classifier under additive noise (STN Algorithm 1, Cohen et al.'s Smooth).

The noisy classifier g(x) = argmax_j P(f(x + noise) = j) is robust at x within
a radius that depends only on its top-two probabilities p1 > p2 (``bounds``).
Those are estimated from Monte Carlo counts, so a certificate is a statement
that holds with probability >= ``confidence`` over the noise:

1. select the top class c from n0 samples (Cohen et al.'s CERTIFY; a separate
   seed stream, so the n estimation samples are independent of the choice);
2. from n further samples, p1_lower = one-sided Clopper-Pearson lower bound of
   count[c] and p2_upper = upper bound of the largest other count, each at
   level alpha / 2 (Bonferroni, STN section 4 "Confidence interval and sample
   size"), alpha = 1 - confidence;
3. abstain iff p1_lower <= p2_upper, else report radii from (p1_lower, p2_upper).

A bound certifies nothing where its radius is 0: Cohen et al.'s CERTIFY abstains
when its own lower bound on p_A is at most 1/2, even where the pair test of
step 3 predicts (``Certificate.abstains``); certified accuracy never counts
such an image, at any radius, 0 included.  Cohen et al.'s PREDICT on the same n
estimation samples is reported beside the certificate (``Certificate.predict``).

The logic lives in ``certify_from_counts``, which takes any count sampler;
``Smooth`` supplies one that runs a model on seeded noise.  Terminology:
``confidence`` = 1 - alpha is the statistical level; ``order`` is a Renyi
order (``bounds``); the two are never both called alpha.
"""
from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.stats import binomtest
from torch import Tensor, nn

from robust.attacks.smoothed_pgd import sample_noise
from robust.certify.bounds import cohen_l2_radius, laplace_l1_radius, pixeldp_l2_radius, renyi_l2_radius
from robust.certify.confidence import lower_bound, upper_bound
from robust.device import fast_layout
from robust.seeding import derive_seed

ABSTAIN = -1

# Radii reported per noise; the first is the paper's and the default for early stopping.
BOUNDS: Dict[str, Tuple[str, ...]] = {"gaussian": ("renyi", "cohen", "pixeldp"), "laplace": ("laplace",)}

CERTIFY_PRESETS: Dict[str, Dict[str, Union[int, float]]] = {
    # STN section 4, "Confidence interval and sample size": one-sided Clopper-Pearson
    # bounds with Bonferroni, "the end points ... of the 95% confidence intervals".
    # The sentence that gives the sample size is garbled in our copy of the paper
    # ("we find a sample size of ... 1 as sufficient"); the authors' released
    # STN-Code (bound.py) draws 100 noisy samples per test image, which we follow.
    # Algorithm 1 selects the class from the same samples; we draw n0 separately.
    "stn": {"n0": 100, "n": 100, "confidence": 0.95},
    # Cohen et al. 2019, section 4 (CIFAR-10): n0 = 100, n = 100,000, alpha = 0.001.
    "cohen": {"n0": 100, "n": 100_000, "confidence": 0.999},
}

DEFAULT_LOOKS = 10  # early stopping without ``batch``: this many looks (fewer only when n < 10)

# (num, first_sample, stream) -> int64 counts per class of samples
# [first_sample, first_sample + num) of that stream ("select" or "estimate").
CountSampler = Callable[[int, int, str], np.ndarray]


@dataclass(frozen=True)
class Certificate:
    """The outcome of ``certify`` for one input.

    ``radius`` maps a bound name (``BOUNDS[noise]``) to its certified radius,
    all 0 when ``prediction == ABSTAIN``; a bound whose radius is 0 abstains
    (:meth:`abstains`).  ``samples_used`` counts every noisy forward pass,
    selection included (n0 + the estimation samples drawn, which is below
    n0 + n only with early stopping).  ``predict`` is Cohen et al.'s PREDICT on
    the n estimation samples at the same confidence (a class or ABSTAIN); None
    with early stopping, whose sample count depends on the samples (a binomial
    test on optionally stopped samples does not hold its level).
    """

    prediction: int
    p1_lower: float
    p2_upper: float
    radius: Dict[str, float]
    n: int
    n0: int
    confidence: float
    sigma: float
    noise: str
    seconds: float
    samples_used: int
    predict: Optional[int] = None

    def abstains(self, bound: str) -> bool:
        """Whether ``bound`` certifies nothing here: the pair test abstains, or the bound's own
        test does (radius 0; Cohen's CERTIFY abstains when its p_A lower bound is <= 1/2)."""
        return self.prediction == ABSTAIN or not self.radius[bound] > 0

    def certified_at(self, radius: float, bound: str) -> bool:
        """Whether this certificate guarantees its prediction at distance ``radius`` by ``bound``
        (never where the bound abstains, at radius 0 included)."""
        return not self.abstains(bound) and self.radius[bound] >= radius


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_noise(noise: str, sigma: float) -> None:
    if noise not in BOUNDS:
        raise ValueError(f"noise must be one of {sorted(BOUNDS)}, got {noise!r}")
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma (the noise scale) must be a finite number > 0, got {sigma!r}")


def check_confidence(confidence: float) -> None:
    if not (_is_real(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence (= 1 - alpha) must be in the open interval (0, 1), got {confidence!r}")


def check_sample_sizes(n0: int, n: int) -> None:
    if int(n0) != n0 or n0 < 1:
        raise ValueError(f"n0 (selection samples) must be an integer >= 1, got {n0!r}")
    if int(n) != n or n < n0:
        raise ValueError(f"n (estimation samples) must be an integer >= n0 = {n0}, got n = {n!r}")


def per_look_alpha(alpha: float, looks: int) -> float:
    """Error level of each of ``looks`` sequential looks: alpha / looks (union bound)."""
    return alpha / looks


def look_batch(n: int) -> int:
    """Estimation samples per look of early stopping: ceil(n / DEFAULT_LOOKS), so that there
    are DEFAULT_LOOKS looks (n of them when n < DEFAULT_LOOKS) whatever the throughput chunk."""
    return math.ceil(n / DEFAULT_LOOKS)


def largest_radius(n: int, confidence: float, sigma: float, bound: str, looks: int = 1) -> float:
    """The largest radius ``bound`` can certify from n estimation samples at ``confidence``:
    every sample on the top class (k1 = n, k2 = 0), each of ``looks`` looks at level
    alpha / looks (early stopping); 0 when even that abstains.  E.g. Cohen's bound at
    sigma 0.25, n = 100, confidence 0.95, one look: 0.25 * Phi^-1(0.05^(1/100)) = 0.472."""
    level = per_look_alpha(1.0 - confidence, looks)
    radius = _decision_radii(np.array([n]), np.array([0]), np.array([n]), level, sigma, bound)
    return max(float(radius[0]), 0.0)


def check_reachable(radius: float, n: int, confidence: float, sigma: float, noise: str, bound: str,
                    looks: int) -> None:
    """ValueError (one line, naming the largest reachable radius) when ``radius`` cannot be
    certified by ``bound`` at this sigma, n and confidence with ``looks`` looks."""
    largest = largest_radius(n, confidence, sigma, bound, looks)
    if radius > largest:
        raise ValueError(
            f"radius {radius:g} cannot be certified by the {bound} bound at sigma {sigma:g} ({noise}) with "
            f"n = {n} and confidence {confidence:g} ({looks} look(s)): the largest reachable radius is "
            f"{math.floor(largest * 1000) / 1000:.3f}; ask for a smaller radius, more samples (--n) or a larger sigma")


def pair_bounds(counts: np.ndarray, top: int, alpha: float) -> Tuple[float, float]:
    """(p1_lower, p2_upper) at level alpha / 2 each: jointly valid with probability >= 1 - alpha.

    p2_upper bounds the largest probability among the other classes: the
    largest other count is >= the count of the truly second class, and the
    upper bound grows with the count.
    """
    n = int(counts.sum())
    others = np.delete(counts, top)
    return lower_bound(int(counts[top]), n, alpha / 2), upper_bound(int(others.max()), n, alpha / 2)


def radii_from_counts(
    counts: np.ndarray, top: int, alpha: float, sigma: float, noise: str
) -> Tuple[int, float, float, Dict[str, float]]:
    """(prediction, p1_lower, p2_upper, radius per bound) from estimation counts at level alpha.

    The Cohen radius uses its own one-sided lower bound on count[top] at level
    alpha (not alpha / 2), as in Cohen et al.'s CERTIFY: it is a separate
    statement with error alpha; using it together with the pair-based radii
    holds with probability >= 1 - 2 alpha.
    """
    p1_lower, p2_upper = pair_bounds(counts, top, alpha)
    if p1_lower <= p2_upper:
        return ABSTAIN, p1_lower, p2_upper, {name: 0.0 for name in BOUNDS[noise]}
    if noise == "laplace":
        return top, p1_lower, p2_upper, {"laplace": laplace_l1_radius(p1_lower, p2_upper, sigma)}
    cohen_p1 = lower_bound(int(counts[top]), int(counts.sum()), alpha)
    radius = {
        "renyi": renyi_l2_radius(p1_lower, p2_upper, sigma),
        "cohen": cohen_l2_radius(cohen_p1, sigma),
        "pixeldp": pixeldp_l2_radius(p1_lower, p2_upper, sigma),
    }
    return top, p1_lower, p2_upper, radius


_RADIUS_FUNCTIONS = {"renyi": renyi_l2_radius, "pixeldp": pixeldp_l2_radius, "laplace": laplace_l1_radius}


def _decision_radii(
    k1: np.ndarray, k2: np.ndarray, n: np.ndarray, level: float, sigma: float, bound: str
) -> np.ndarray:
    """The ``bound`` radius from top counts k1 and largest other counts k2 out of n, at ``level``;
    -1 where the pair test abstains (below any requested radius, 0 included)."""
    p1_lower = lower_bound(k1, n, level / 2)
    p2_upper = upper_bound(k2, n, level / 2)
    if bound == "cohen":
        radius = cohen_l2_radius(lower_bound(k1, n, level), sigma)
    else:
        radius = _RADIUS_FUNCTIONS[bound](p1_lower, p2_upper, sigma)
    return np.where(p1_lower > p2_upper, radius, -1.0)


def _sequential_counts(
    sample_counts: CountSampler, top: int, n: int, alpha: float, sigma: float,
    radius: float, batch: int, bound: str,
) -> Tuple[np.ndarray, float]:
    """Estimation counts after the look that decides the certificate at ``radius``, and its level.

    Looks after every ``batch`` samples, K = ceil(n / batch) looks fixed in
    advance, each at level alpha / K: by the union bound the intervals of all
    K looks hold together with probability >= 1 - alpha, so whichever look
    stops reports a valid certificate.  Stops when the radius already reaches
    ``radius`` or when it cannot at the last look even if every remaining
    sample went to the top class (the best case: the top count only helps, the
    largest other count can only grow).
    """
    looks = math.ceil(n / batch)
    level = per_look_alpha(alpha, looks)
    counts = np.zeros(0, dtype=np.int64)
    used = 0
    while used < n:
        step = min(batch, n - used)
        new = sample_counts(step, used, "estimate")
        counts = new if used == 0 else counts + new
        used += step
        k1, k2 = int(counts[top]), int(np.delete(counts, top).max())
        # Now, and at the last look in the best case.
        now, best = _decision_radii(np.array([k1, k1 + n - used]), np.array([k2, k2]),
                                    np.array([used, n]), level, sigma, bound)
        if now >= radius or best < radius:
            break
    return counts, level


def certify_from_counts(
    sample_counts: CountSampler,
    n0: int,
    n: int,
    confidence: float,
    sigma: float,
    noise: str = "gaussian",
    *,
    radius: Optional[float] = None,
    early_stop: bool = False,
    batch: Optional[int] = None,
    bound: Optional[str] = None,
) -> Certificate:
    """STN Algorithm 1 with Cohen et al.'s selection step, on counts from ``sample_counts``.

    Guarantee: with probability >= ``confidence`` over the noise, either the
    result abstains or the noisy classifier's top class at x is ``prediction``
    and stays so for every x' within ``radius[b]`` of x, for each pair-based
    bound b (renyi, pixeldp, laplace); the cohen radius holds with its own
    probability >= ``confidence`` (see ``radii_from_counts``).

    Without ``early_stop``: n0 selection samples, then n estimation samples;
    ``predict`` is Cohen et al.'s PREDICT on the estimation counts.
    With ``early_stop=True`` and a requested ``radius``: estimation samples in
    batches of ``batch`` (default ``look_batch(n)``), stopping once the
    certificate at ``radius`` by ``bound`` (default the noise's first,
    ``BOUNDS[noise][0]``) is decided; each of the K = ceil(n / batch) looks
    runs at level alpha / K, and the reported bounds are those of the last
    look.  A radius no look could certify even with every sample on the top
    class raises ValueError naming the largest reachable one.
    ``samples_used`` reports the cost.  ``radius`` and ``bound`` are used only
    with ``early_stop``.
    """
    start = time.perf_counter()
    check_noise(noise, sigma)
    check_confidence(confidence)
    check_sample_sizes(n0, n)
    alpha = 1.0 - confidence
    if early_stop:
        bound = bound or BOUNDS[noise][0]
        if bound not in BOUNDS[noise]:
            raise ValueError(f"bound must be one of {BOUNDS[noise]} for {noise} noise, got {bound!r}")
        if radius is None or not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"early_stop needs the requested radius, a finite number >= 0, got {radius!r}")
        batch = batch or look_batch(n)
        if int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        check_reachable(radius, n, confidence, sigma, noise, bound, math.ceil(n / batch))
    top = int(np.argmax(sample_counts(n0, 0, "select")))
    if early_stop:
        counts, level = _sequential_counts(sample_counts, top, n, alpha, sigma, radius, batch, bound)
        predict = None
    else:
        counts, level = sample_counts(n, 0, "estimate"), alpha
        predict = predict_from_counts(counts, confidence)
    prediction, p1_lower, p2_upper, radius_by_bound = radii_from_counts(counts, top, level, sigma, noise)
    return Certificate(
        prediction=prediction, p1_lower=p1_lower, p2_upper=p2_upper, radius=radius_by_bound,
        n=n, n0=n0, confidence=confidence, sigma=sigma, noise=noise,
        seconds=time.perf_counter() - start, samples_used=n0 + int(counts.sum()), predict=predict,
    )


def predict_from_counts(counts: np.ndarray, confidence: float) -> int:
    """Cohen et al.'s PREDICT: the top class if a two-sided binomial test of the top two
    counts rejects a tie at level 1 - confidence, else ABSTAIN.  The probability of
    returning a class other than the noisy classifier's top class is <= 1 - confidence."""
    check_confidence(confidence)
    second, top = np.argsort(counts, kind="stable")[-2:]
    n_top, n_second = int(counts[top]), int(counts[second])
    if binomtest(n_top, n_top + n_second, 0.5).pvalue > 1.0 - confidence:
        return ABSTAIN
    return int(top)


def certified_accuracy(
    certificates: Sequence[Certificate], labels: Sequence[int], radii: Sequence[float], bound: str
) -> np.ndarray:
    """Fraction of inputs certified correct at each radius: prediction == label, the bound
    does not abstain (``Certificate.abstains``), and ``radius[bound] >= r`` (STN Figure 1,
    Cohen et al. Table 1).  At r = 0 it counts the correct predictions the bound certifies."""
    if len(certificates) != len(labels) or not certificates:
        raise ValueError(f"need one label per certificate (and at least one), got "
                         f"{len(certificates)} certificates and {len(labels)} labels")
    if any(bound not in c.radius for c in certificates):
        raise ValueError(f"bound {bound!r} is not in every certificate; they have {sorted(certificates[0].radius)}")
    return np.array([np.mean([c.prediction == y and c.certified_at(r, bound) for c, y in zip(certificates, labels)])
                     for r in radii])


def default_chunk(device: torch.device, input_numel: Optional[int] = None) -> int:
    """Noisy copies per forward pass when ``Smooth`` is given no ``chunk``.

    CPU, measured on the project's 2-core CPU (AMD EPYC, torch 2.14, two
    threads) for small-cnn, timing noise + forward + argmax + bincount,
    median of interleaved runs, relative to the fastest batch:
      3x32x32:  32: 0.98   64: 1.00 (~2,000/s)  128: 0.62  256: 0.62  400: 0.52  1000: 0.53
      1x8x8:    32: 0.78   64: 0.82  128: 0.87  256: 0.94  400: 1.00 (~30,000/s)  1000: 0.63
    The best batch shrinks as inputs grow, so with ``input_numel`` (C*H*W) known
    the CPU chunk interpolates between the two measured optima,
    64 * sqrt(3072 / input_numel) clamped to [32, 400] (3x32x32: 64; 1x28x28:
    about 128; 1x8x8: 400); without it, 64, the CIFAR-size optimum.
    CUDA: 1000 (Cohen et al. certify with batches of 400-1000 on a GPU; not
    measured here).
    """
    if device.type == "cuda":
        return 1000
    if not input_numel:
        return 64
    return int(min(400, max(32, round(64 * math.sqrt(3072 / input_numel)))))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration, then every submodule's own mode back."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode


# Extra derive_seed coordinates that separate the noise streams of one image.
_STREAM_TAGS: Dict[str, Tuple[int, ...]] = {"estimate": (), "select": (1,), "predict": (2,)}


class Smooth:
    """A classifier under additive noise: Cohen et al.'s ``Smooth`` with STN's certificates.

    Args:
        model: base classifier, (N, *input_shape) -> (N, num_classes) logits;
            run in eval mode (restored afterwards), float32, no autocast.
        num_classes: number of classes.
        sigma: noise scale: the standard deviation of Gaussian noise
            N(0, sigma^2 I), or the scale lambda of i.i.d. Laplace noise
            (density exp(-|z| / lambda) / (2 lambda)).
        noise: "gaussian" (l2 certificates) or "laplace" (l1, STN Theorem 3).
        chunk: noisy copies per forward pass (default ``default_chunk``, sized
            by ``input_shape`` when given).  It also fixes the chunk boundaries
            that seeds attach to, so two ``Smooth`` objects give the same counts
            only with the same chunk.
        seed: base seed; chunk c of image ``image_id`` uses
            ``derive_seed(seed, image_id, c)`` (estimation stream) and
            separate streams for selection and ``predict``.

    Example:
        >>> smooth = Smooth(model, num_classes=10, sigma=0.25)
        >>> cert = smooth.certify(x, **CERTIFY_PRESETS["cohen"], image_id=7)
        >>> cert.prediction, cert.radius["renyi"], cert.radius["cohen"]
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        noise: str = "gaussian",
        chunk: Optional[int] = None,
        seed: int = 0,
        input_shape: Optional[Tuple[int, ...]] = None,
    ) -> None:
        check_noise(noise, sigma)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if chunk is not None and (int(chunk) != chunk or chunk < 1):
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        self.model = model
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.noise = noise
        self.device = _model_device(model)
        numel = math.prod(input_shape) if input_shape else None
        self.chunk = int(chunk) if chunk is not None else default_chunk(self.device, numel)
        self.seed = seed


    def sample_counts(
        self, x: Tensor, n: int, image_id: int, first_chunk: int = 0, stream: str = "estimate"
    ) -> np.ndarray:
        """Class counts of the base model on n noisy copies of x.

        x: one input without batch dimension, e.g. [C x H x W].  The n samples
        are chunks first_chunk, first_chunk + 1, ... of ``self.chunk`` copies
        (the last one partial), chunk c drawn from
        ``torch.Generator(device).manual_seed(derive_seed(seed, image_id, c, *stream tag))``.
        So counts for chunks [0, k) plus counts for chunks [k, m) equal counts
        for chunks [0, m): one image's samples can be sharded over workers on
        chunk boundaries.  Returns an int64 numpy array of length num_classes.
        """
        if stream not in _STREAM_TAGS:
            raise ValueError(f"stream must be one of {sorted(_STREAM_TAGS)}, got {stream!r}")
        x = x.to(self.device, dtype=torch.float32)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        with _eval_mode(self.model), torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for c in range(math.ceil(n / self.chunk)):
                size = min(self.chunk, n - c * self.chunk)
                seed = derive_seed(self.seed, image_id, first_chunk + c, *_STREAM_TAGS[stream])
                generator = torch.Generator(self.device).manual_seed(seed)
                copies = x.unsqueeze(0).expand(size, *x.shape)
                logits = self.model(fast_layout(copies + sample_noise(copies, self.noise, self.sigma, generator)))
                if logits.shape[-1] != self.num_classes:
                    raise ValueError(f"model returns {logits.shape[-1]} logits, Smooth expects {self.num_classes}")
                counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)
        return counts.cpu().numpy()

    def predict(self, x: Tensor, n: int, confidence: float, image_id: int = 0) -> int:
        """Cohen et al.'s PREDICT on n samples: the noisy classifier's top class, or
        ABSTAIN; wrong (not abstained and not the top class) with probability <= 1 - confidence."""
        check_confidence(confidence)
        return predict_from_counts(self.sample_counts(x, n, image_id, stream="predict"), confidence)

    def certify(
        self,
        x: Tensor,
        n0: int,
        n: int,
        confidence: float,
        image_id: int = 0,
        *,
        radius: Optional[float] = None,
        early_stop: bool = False,
        batch: Optional[int] = None,
        bound: Optional[str] = None,
    ) -> Certificate:
        """Certify x ([C x H x W]): see ``certify_from_counts`` for the procedure and guarantee.

        With ``early_stop`` the looks follow n, not the throughput chunk: ``batch``
        (default ``look_batch(n)``) samples per look, drawn in passes of at most
        ``self.chunk`` copies.  Look j takes the estimation chunks from
        j * ceil(batch / chunk) on (its last one partial when the chunk does not
        divide the batch), so every chunk seed is used once.
        """
        look = batch or look_batch(n)  # certify_from_counts validates it before any sample is drawn

        def sample_counts(num: int, first_sample: int, stream: str) -> np.ndarray:
            if early_stop and stream == "estimate":
                first_chunk = (first_sample // look) * math.ceil(look / self.chunk)
            else:
                first_chunk = first_sample // self.chunk
            return self.sample_counts(x, num, image_id, first_chunk, stream)

        return certify_from_counts(
            sample_counts, n0, n, confidence, self.sigma, self.noise,
            radius=radius, early_stop=early_stop, batch=batch, bound=bound,
        )
