"""The training loop under torch.distributed (gloo, 2 processes), as Ray Train runs it."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robust.data import create_dataset
from robust.defenses import create_defense
from robust.models import create_model
from robust.train import TrainConfig, fit
from robust.train.loop import evaluate_accuracy


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    splits = create_dataset("synthetic")
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8,
                         mean=splits.mean, std=splits.std)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=2e-3, weight_decay=0.0,
                      schedule="constant", val_attack_steps=2)
    module, history = fit(model, create_defense("constant", eps_data=splits.eps, copies=2), splits, cfg,
                          seed=0, device=torch.device("cpu"))
    torch.save({"state": module.state_dict(), "history": history}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ddp_ranks_stay_identical_and_metrics_cover_the_whole_split(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v)  # DDP kept the replicas in sync
    h0, h1 = r0["history"][-1], r1["history"][-1]
    assert h0["train_loss"] == pytest.approx(h1["train_loss"])  # all-reduced, not per-rank
    # the sharded, all-reduced validation accuracy equals a single-process evaluation
    splits = create_dataset("synthetic")
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8,
                         mean=splits.mean, std=splits.std)
    model.load_state_dict(r0["state"])
    assert h0["val_acc"] == pytest.approx(evaluate_accuracy(model, splits.val, torch.device("cpu"), 64))
