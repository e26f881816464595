"""Contract tests over every registered model (in the manner of timm's tests/test_models.py).

Every model maps images in [0, 1] shaped (N, C, H, W) to finite logits
(N, num_classes), sends a gradient to every parameter, normalises its input as
its first layer, and gives the same answer for channels_last input.  Large
models run on 2 images so the file stays CPU-sized.
"""
from __future__ import annotations

from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust.models import create_model, model_names
from robust.models.layers import Normalize, NormalizedClassifier
from robust.registry import UnknownNameError

pytestmark = pytest.mark.timeout(120)

ALL_MODELS = model_names()
LARGE_MODELS = {"wrn-28-10", "resnet18", "preact-resnet18"}


def _batch_size(name: str) -> int:
    return 2 if name in LARGE_MODELS else 4


def _images(name: str, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(_batch_size(name), channels, size, size, generator=generator)


def _model(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **kwargs)


def test_registry_lists_the_expected_models() -> None:
    expected = {"wrn-28-10", "wrn-16-4", "resnet18", "preact-resnet18", "resnet20", "resnet32",
                "resnet44", "resnet56", "lenet", "mlp3", "cnn7", "small-cnn"}
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_gives_finite_logits_and_eval_is_deterministic(name: str) -> None:
    model = _model(name, num_classes=7)
    x = _images(name)
    logits = model(x)
    assert logits.shape == (x.shape[0], 7)
    assert torch.isfinite(logits).all()
    # A model without a randomized defense is a deterministic function in eval
    # mode (dropout off, BN running statistics), which the attack checks rely on.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _model(name)
    x = _images(name).requires_grad_(True)
    labels = torch.arange(x.shape[0]) % 10
    F.cross_entropy(model(x), labels).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"
    # Attacks need the gradient with respect to the pixels.
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28)])
def test_small_grayscale_inputs(name: str, channels: int, size: int) -> None:
    """8x8 digits and 28x28 MNIST work for every model built for that shape."""
    model = _model(name, num_classes=10, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        logits = model(_images(name, channels, size))
    assert logits.shape == (_batch_size(name), 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name,count",
    [("resnet18", 11_173_962), ("resnet20", 269_722), ("resnet56", 853_018)],
)
def test_exact_parameter_counts(name: str, count: int) -> None:
    assert sum(p.numel() for p in create_model(name).parameters()) == count


def test_wrn_28_10_has_the_paper_size_and_dropout() -> None:
    model = create_model("wrn-28-10")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 36_500_000) <= 100_000
    assert count == 36_479_194
    # Constant-random-perturbations paper, A.1: WRN-28-10 with dropout 0.1.
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 12 and set(dropouts) == {0.1}


def test_unknown_name_lists_valid_choices() -> None:
    with pytest.raises(UnknownNameError) as error:
        create_model("nope")
    message = str(error.value)
    assert "'nope'" in message
    for name in ("resnet18", "wrn-28-10", "small-cnn", "wrn-D-K"):
        assert name in message


def test_wrn_names_resolve_by_pattern() -> None:
    assert {"wrn-28-10", "wrn-16-4"} <= set(model_names())
    assert sum(p.numel() for p in create_model("wrn-16-4").parameters()) == 2_748_890
    # An unregistered depth/width resolves through the wrn-D-K pattern:
    # depth 10 means one block per group, width 2 means 32/64/128 channels.
    model = create_model("wrn-10-2", num_classes=5)
    assert isinstance(model, NormalizedClassifier)
    assert model.body.fc.in_features == 128
    assert [len(g) for g in (model.body.block1, model.body.block2, model.body.block3)] == [1, 1, 1]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    # a depth that is not 6n + 4 is not a model name: rejected before anything is built
    with pytest.raises(UnknownNameError, match=r"wrn-D-K for any Wide-ResNet with \(D - 4\) % 6 == 0"):
        create_model("wrn-30-10")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_invalid_arguments_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="unexpected argument"):
        create_model(name, not_an_option=1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, num_classes=0)
    with pytest.raises(ValueError, match="in_channels=3"):
        create_model(name, mean=(0.5, 0.5))


def test_family_options_are_validated_and_used() -> None:
    assert create_model("resnet20", width=2).body.fc.in_features == 128
    no_dropout = create_model("wrn-16-4", dropout=0.0)
    assert {m.p for m in no_dropout.modules() if isinstance(m, nn.Dropout)} == {0.0}
    with pytest.raises(ValueError, match="width"):
        create_model("resnet20", width=0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("wrn-16-4", dropout=1.0)
    with pytest.raises(ValueError, match="std"):
        create_model("mlp3", std=(0.2, 0.0, 0.2))


def test_normalize_defaults_map_unit_interval_to_plus_minus_one() -> None:
    normalize = Normalize(in_channels=3)
    assert list(normalize.parameters()) == []
    assert set(normalize.state_dict()) == {"mean", "std"}
    x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    out = normalize(x)
    assert torch.equal(out[0], -torch.ones(3, 2, 2)) and torch.equal(out[1], torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="expected images"):
        normalize(torch.rand(2, 1, 4, 4))  # would otherwise broadcast to 3 channels


@pytest.mark.parametrize("name", ALL_MODELS)
def test_normalization_is_the_first_layer(name: str) -> None:
    """model(x) == body((x - mean) / std): the model sees pixels in [0, 1]."""
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    model = _model(name, mean=mean, std=std).eval()
    assert isinstance(model, NormalizedClassifier)
    assert not any(p.startswith("normalize.") for p, _ in model.named_parameters())
    x = _images(name)
    expected_input = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.body(expected_input), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = _model(name).eval()
    x = _images(name)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        logits = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def _amp_setting() -> Tuple[str, torch.dtype]:
    """float16 autocast on CUDA where there is one, bfloat16 autocast on CPU otherwise."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.bfloat16


@pytest.mark.parametrize("name", ALL_MODELS)
def test_autocast_with_channels_last_trains(name: str) -> None:
    device, dtype = _amp_setting()
    model = _model(name).to(device=device, memory_format=torch.channels_last)
    x = _images(name).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(x.shape[0], device=device) % 10
    with torch.autocast(device_type=device, dtype=dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
