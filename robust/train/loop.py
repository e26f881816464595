"""One training loop for every defense.

The loop consults the defense through its hooks (see
:mod:`robust.defenses.base`) and never asks which defense it runs.  It is plain
PyTorch: when ``torch.distributed`` is initialised (Ray Train sets up the
process group) it wraps the model in DistributedDataParallel, shards the
training set with a DistributedSampler and shards validation, all-reducing the
counts; otherwise it runs in one process.  Selection metrics come from the
validation split only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from robust.attacks.pgd import PGD
from robust.data.augment import augment_batch
from robust.data.base import DatasetSplits, ImageSplit
from robust.defenses.base import Defense, TrainStep
from robust.device import autocast, prepare_input, prepare_module
from robust.seeding import derive_seed
from robust.train.config import TrainConfig

EpochCallback = Callable[[Dict[str, Any], Callable[[], Dict[str, Any]]], None]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the trial stops with this reason."""


@dataclass
class TrainState:
    """What a checkpoint holds, enough to resume at ``epoch + 1``."""

    epoch: int
    model: Dict[str, Tensor]
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    defense: Dict[str, Any] = field(default_factory=dict)  # Defense.state_dict()
    step: int = 0  # optimiser steps taken so far


def cpu_copy(obj: Any) -> Any:
    """A snapshot with every tensor cloned to CPU (state dicts hold live references)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    world, _ = _world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def build_optimizer(groups: List[Dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Per-epoch schedule: multistep at fractions of the epochs, cosine, or constant."""
    if cfg.schedule == "multistep":
        milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.lr_decay)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _fetch(dataset: Dataset, positions: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    if hasattr(dataset, "batch"):
        return dataset.batch(torch.as_tensor(positions))
    items = [dataset[p] for p in positions]
    return tuple(torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(3))  # type: ignore


def _batches(dataset: Dataset, sampler: DistributedSampler, batch_size: int) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    order = list(iter(sampler))
    for start in range(0, len(order), batch_size):
        yield _fetch(dataset, order[start:start + batch_size])


def evaluate_accuracy(module: nn.Module, split: ImageSplit, device: torch.device, batch_size: int,
                      attack: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None) -> float:
    """Accuracy on ``split`` (clean, or on ``attack``'s outputs), sharded over ranks."""
    world, rank = _world()
    positions = list(range(rank, len(split), world))
    was_training = module.training
    module.eval()
    correct = 0.0
    for start in range(0, len(positions), batch_size):
        x, y, _ = split.batch(torch.as_tensor(positions[start:start + batch_size]))
        x, y = prepare_input(x, device), y.to(device)
        if attack is not None:
            x = attack(module, x, y)
        with torch.no_grad():
            correct += float((module(x).argmax(1) == y).sum())
    module.train(was_training)
    total_correct, = _all_reduce_sum([correct], device)
    return total_correct / max(len(split), 1)


def _train_epoch(model: nn.Module, module: nn.Module, defense: Defense, dataset: Dataset,
                 sampler: DistributedSampler, optimizer: torch.optim.Optimizer, splits: DatasetSplits,
                 cfg: TrainConfig, device: torch.device, seed: int, epoch: int,
                 counter: List[int]) -> Dict[str, float]:
    world, rank = _world()
    model.train()
    aug_gen = torch.Generator().manual_seed(derive_seed(seed, epoch, rank, 1))
    noise_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, epoch, rank, 2))
    loss_sum = correct = seen = 0.0
    for batch_no, (x, y, index) in enumerate(_batches(dataset, sampler, cfg.batch_size)):
        x = augment_batch(x, splits.augment, generator=aug_gen)
        x, y = prepare_input(x, device), y.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            out = defense.loss(TrainStep(model, module, x, y, index, epoch, noise_gen))
        finite = torch.isfinite(out.loss.detach()).float()
        if world > 1:  # every rank must stop together, or the others hang in all-reduce
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise NonFiniteLoss(f"training loss became non-finite at epoch {epoch}, batch {batch_no}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        counter[0] += 1
        defense.after_step(module, optimizer, counter[0])
        n = y.shape[0]
        loss_sum += float(out.loss.detach()) * n
        correct += float((out.logits.detach().argmax(1) == y).sum())
        seen += n
    loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}


def fit(model: nn.Module, defense: Defense, splits: DatasetSplits, cfg: TrainConfig, *, seed: int,
        device: torch.device, resume: Optional[TrainState] = None,
        on_epoch_end: Optional[EpochCallback] = None) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """Train ``model`` with ``defense`` for ``cfg.epochs`` epochs; return (module, history).

    ``on_epoch_end(metrics, state_fn)`` is called after every epoch on every
    rank; ``state_fn()`` returns the :class:`TrainState` dict to checkpoint.
    With ``resume`` the loop continues at ``resume.epoch + 1`` with the saved
    model, optimiser, schedule and history: no epoch is lost or repeated.
    Raises :class:`NonFiniteLoss` when the loss becomes NaN or infinite.
    """
    defense.check_train_config(cfg)
    world, rank = _world()
    module = prepare_module(defense.prepare_model(model), device)
    optimizer = build_optimizer(defense.param_groups(module), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    history: List[Dict[str, Any]] = []
    start_epoch = 1
    counter = [0]  # optimiser steps over the whole run
    if resume is not None:
        module.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        history = list(resume.history)
        start_epoch = resume.epoch + 1
        defense.load_state_dict(resume.defense)
        counter[0] = resume.step
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model_for_step: nn.Module = DistributedDataParallel(module, device_ids=ids)
    else:
        model_for_step = module
    dataset = defense.train_dataset(splits.train, seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    val_attack = PGD(eps=splits.eps, steps=cfg.val_attack_steps, random_start=True, seed=seed)
    last_val_pgd = history[-1]["val_pgd_acc"] if history else float("nan")
    last_extra: Dict[str, float] = {k: v for k, v in (history[-1] if history else {}).items()
                                     if k.startswith("val_") and k not in ("val_acc", "val_pgd_acc")}

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        defense.on_epoch_start(epoch, dataset)
        lr = optimizer.param_groups[0]["lr"]
        metrics: Dict[str, Any] = {"epoch": epoch, "lr": lr}
        metrics.update(_train_epoch(model_for_step, module, defense, dataset, sampler, optimizer,
                                    splits, cfg, device, seed, epoch, counter))
        scheduler.step()
        metrics["val_acc"] = evaluate_accuracy(module, splits.val, device, cfg.eval_batch_size)
        if epoch % cfg.val_attack_every == 0 or epoch == cfg.epochs:
            last_val_pgd = evaluate_accuracy(module, splits.val, device, cfg.eval_batch_size, val_attack)
            last_extra = defense.validation_metrics(module, splits.val, device, seed)
        metrics["val_pgd_acc"] = last_val_pgd
        metrics.update(last_extra)
        metrics.update(defense.on_epoch_end(epoch, metrics) or {})
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append(metrics)
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLoss(f"training loss became non-finite at epoch {epoch}")
        if on_epoch_end is not None:
            def state_fn(epoch: int = epoch) -> Dict[str, Any]:
                return vars(TrainState(epoch, cpu_copy(module.state_dict()),
                                       cpu_copy(optimizer.state_dict()),
                                       cpu_copy(scheduler.state_dict()), cpu_copy(history),
                                       cpu_copy(defense.state_dict()), counter[0]))
            on_epoch_end(dict(metrics), state_fn)
    return module, history
