"""Stochastic-weight layers, and the conversion of any model to them.

Every ``nn.Linear`` and ``nn.Conv2d`` of a model is replaced by a layer whose
weight and bias are perturbed by a fresh random ``delta`` at every forward
pass, in training *and* in eval mode:

    w = weight + delta_w,   b = bias + delta_b.

``weight`` and ``bias`` keep their names (the deterministic model's state dict
keys stay valid); the noise distribution is a child module ``noise`` with its
own parameters, e.g. ``GaussianWeightNoise`` (SDR: delta = sigma * eps) or
``DropConnectNoise`` (w * mask / (1 - p) - w).  Noise draws from torch's global
RNG, so ``torch.manual_seed`` before a pass makes it reproducible (the
evaluation protocol seeds it per batch), except inside :func:`sampling_from`,
which routes every draw to an explicit generator (the training loop's, so that
training noise is a function of (seed, epoch, rank) and a resumed run repeats
an uninterrupted one exactly).

Two sampling modes:

* per batch (the SDR paper, Algorithm 2 line 6): one weight draw shared by the
  whole batch, a single convolution/matmul with ``weight + delta``;
* per example (``per_example=True``, for small models): every example gets its
  own draw; the layer computes the deterministic output plus the noise term
  ``x * delta_n`` (a batched matmul, or a grouped convolution with one group per
  example), so memory grows with batch x parameters.

With zero noise (sigma = 0) both modes compute exactly the deterministic layer:
``weight + 0 * eps`` is bit-identical to ``weight``, and the per-example noise
term is exactly zero.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Deltas = Tuple[Optional[Tensor], Optional[Tensor]]
NoiseFactory = Callable[[nn.Module], nn.Module]


class GaussianWeightNoise(nn.Module):
    """delta = sigma * eps, eps ~ N(0, 1): the weight is N(mu, sigma^2) (SDR, section 4.1).

    ``weight_sigma`` / ``bias_sigma`` are standard deviations with the shapes of
    the layer's weight and bias, filled with ``sigma_init``.  ``learnable``
    decides whether back-propagation reaches them (SDR-Learnable's
    reparameterisation w = mu + sigma * eps, section 4.3) or not (SDR-Decay,
    whose sigma follows its own update rule, Algorithm 2).
    """

    def __init__(self, layer: nn.Module, sigma_init: float, learnable: bool) -> None:
        super().__init__()
        self.weight_sigma = nn.Parameter(torch.full_like(layer.weight, sigma_init), requires_grad=learnable)
        self.bias_sigma = (None if layer.bias is None else
                           nn.Parameter(torch.full_like(layer.bias, sigma_init), requires_grad=learnable))

    def sigmas(self) -> List[Tensor]:
        return [s for s in (self.weight_sigma, self.bias_sigma) if s is not None]

    def deltas(self, layer: nn.Module, batch: Optional[int], generator: Optional[torch.Generator]) -> Deltas:
        return (_gaussian(self.weight_sigma, batch, generator),
                None if self.bias_sigma is None else _gaussian(self.bias_sigma, batch, generator))


def _gaussian(sigma: Tensor, batch: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    shape = sigma.shape if batch is None else (batch, *sigma.shape)
    return sigma * torch.randn(shape, generator=generator, device=sigma.device, dtype=sigma.dtype)


class DropConnectNoise(nn.Module):
    """DropConnect (Wan et al. 2013): each weight kept with probability 1 - p, rescaled by
    1 / (1 - p) so that the expected weight is the stored one (biases are not dropped).

    ``sample_at_inference``: keep drawing masks in eval mode (the stochastic
    baseline of the SDR paper, Table 1); otherwise eval mode uses the expected
    weights (delta = 0).
    """

    def __init__(self, p: float, sample_at_inference: bool) -> None:
        super().__init__()
        self.p = float(p)
        self.sample_at_inference = sample_at_inference

    def deltas(self, layer: nn.Module, batch: Optional[int], generator: Optional[torch.Generator]) -> Deltas:
        if self.p == 0 or not (self.training or self.sample_at_inference):
            return None, None
        w = layer.weight
        shape = w.shape if batch is None else (batch, *w.shape)
        keep = torch.bernoulli(torch.full(shape, 1.0 - self.p, device=w.device, dtype=w.dtype),
                               generator=generator)
        return w * (keep / (1.0 - self.p) - 1.0), None

    def extra_repr(self) -> str:
        return f"p={self.p}, sample_at_inference={self.sample_at_inference}"


class _StochasticMixin:
    """Shared by the two layer types: ``noise`` gives the deltas, ``per_example`` the mode,
    ``generator`` (None: torch's global RNG) the source of randomness."""

    noise: nn.Module
    per_example: bool
    generator: Optional[torch.Generator] = None

    def _deltas(self, x: Tensor) -> Deltas:
        return self.noise.deltas(self, x.shape[0] if self.per_example else None, self.generator)

    @staticmethod
    def _plus(param: Optional[Tensor], delta: Optional[Tensor]) -> Optional[Tensor]:
        return param if param is None or delta is None else param + delta


class StochasticLinear(_StochasticMixin, nn.Linear):
    """``nn.Linear`` with a weight drawn afresh at every forward pass.

    Shape: (N, *, in_features) -> (N, *, out_features); per example, the draw
    of example n applies to every position of x[n].
    """

    def forward(self, x: Tensor) -> Tensor:
        dw, db = self._deltas(x)
        if not self.per_example:
            return F.linear(x, self._plus(self.weight, dw), self._plus(self.bias, db))
        out = F.linear(x, self.weight, self.bias)
        if dw is not None:
            out = out + torch.einsum("n...i,noi->n...o", x, dw)
        if db is not None:
            out = out + db.view(db.shape[0], *([1] * (out.dim() - 2)), db.shape[1])
        return out


class StochasticConv2d(_StochasticMixin, nn.Conv2d):
    """``nn.Conv2d`` with a weight drawn afresh at every forward pass.

    Shape: (N, C_in, H, W) -> (N, C_out, H', W').  Per example, the noise term is
    one grouped convolution with N * groups groups over the batch folded into channels.
    """

    def forward(self, x: Tensor) -> Tensor:
        dw, db = self._deltas(x)
        if not self.per_example:
            return self._conv_forward(x, self._plus(self.weight, dw), self._plus(self.bias, db))
        out = self._conv_forward(x, self.weight, self.bias)
        if dw is not None:
            out = out + self._per_example_conv(x, dw)
        if db is not None:
            out = out + db[:, :, None, None]
        return out

    def _per_example_conv(self, x: Tensor, dw: Tensor) -> Tensor:
        n = x.shape[0]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        folded = x.reshape(1, n * x.shape[1], *x.shape[2:])
        y = F.conv2d(folded, dw.reshape(n * dw.shape[1], *dw.shape[2:]), None, self.stride, padding,
                     self.dilation, self.groups * n)
        return y.reshape(n, self.out_channels, *y.shape[2:])


def _replacement(layer: nn.Module) -> Optional[nn.Module]:
    """An empty stochastic twin of ``layer`` built on the meta device (no RNG drawn, no memory)."""
    if type(layer) is nn.Linear:
        return StochasticLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device="meta")
    if type(layer) is nn.Conv2d:
        return StochasticConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None,
                                padding_mode=layer.padding_mode, device="meta")
    return None


def to_stochastic(model: nn.Module, make_noise: NoiseFactory, per_example: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` in place by its stochastic twin.

    The twin reuses the layer's own ``weight`` and ``bias`` Parameters (so the
    means start at the trained or initialised values) and gets
    ``noise = make_noise(layer)``.  Deterministic given its arguments: the
    same model and factory always give the same structure and state dict keys.
    Returns ``model``, marked ``noise_shared_in_batch`` when one draw serves a
    whole batch (EOT must then not stack its samples into one forward pass).
    ValueError when the model has no such layer.
    """
    targets = [(name, m) for name, m in model.named_modules() if _replacement(m) is not None]
    if not targets:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to make stochastic")
    for name, layer in targets:
        if not name:
            raise ValueError("to_stochastic converts the layers inside a model, not a bare layer")
        twin = _replacement(layer)
        twin.weight = layer.weight
        twin.bias = layer.bias
        twin.per_example = per_example
        twin.noise = make_noise(layer)
        twin.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, twin)
    model.noise_shared_in_batch = not per_example
    return model


def stochastic_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) of every stochastic layer of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, (StochasticLinear, StochasticConv2d)):
            yield name, m


@contextlib.contextmanager
def sampling_from(model: nn.Module, generator: Optional[torch.Generator]) -> Iterator[None]:
    """Within the block, every stochastic layer of ``model`` draws from ``generator``."""
    layers = [m for _, m in stochastic_layers(model)]
    for m in layers:
        m.generator = generator
    try:
        yield
    finally:
        for m in layers:
            m.generator = None
