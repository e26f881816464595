"""Search plans: presets, distinct configurations, seeds as a grid axis, concurrency."""
from __future__ import annotations

import pytest
from ray import tune  # search-space objects only; starts no Ray

from cluster.experiment import ExperimentPlan, _param_space, draw_configurations, plan_resources
from robust.presets import get_preset
from tuning import search_module


def test_smoke_preset_is_the_embedded_default_and_paper_is_the_paper():
    smoke = get_preset("constant", "smoke")
    assert (smoke.dataset, smoke.samples, smoke.seeds) == ("digits", 4, 1)
    paper = get_preset("constant", "paper")
    assert (paper.dataset, paper.model, paper.model_config["dropout"]) == ("cifar10", "wrn-28-10", 0.1)
    assert (paper.train["epochs"], paper.train["lr"], paper.seeds) == (700, 0.02, 5)  # A.1, section 3
    assert paper.attacks == ["fgsm", "pgd-7", "pgd-20", "pgd-100"]                     # Table 1
    with pytest.raises(ValueError, match="valid choices: smoke, paper"):
        get_preset("constant", "huge")


def test_constant_space_is_relative_to_eps_data():
    space = search_module("constant").space(8 / 255)
    assert space["bound"].categories == pytest.approx([8 / 255, 16 / 255, 24 / 255, 32 / 255])
    assert space["copies"].categories == [1, 5, 10, 20]
    assert space["distribution"].categories == ["uniform", "gaussian"]
    smoke = search_module("constant").smoke_space(0.1)
    assert set(smoke["bound"].categories) <= set(search_module("constant").space(0.1)["bound"].categories)


def test_draws_are_distinct_seeded_and_capped_by_the_space():
    space = search_module("constant").space(8 / 255)  # 32 configurations
    a = draw_configurations(space, 10, seed=0)
    assert len(a) == 10 and len({tuple(sorted(c.items())) for c in a}) == 10
    assert a == draw_configurations(space, 10, seed=0)
    assert a != draw_configurations(space, 10, seed=1)
    assert len(draw_configurations(search_module("constant").smoke_space(0.1), 99)) == 4
    assert draw_configurations({"x": tune.uniform(0, 1)}, 3) is None  # continuous: Tune samples


def test_seeds_are_a_grid_axis_over_the_same_configurations():
    plan = ExperimentPlan(name="e", defense="constant", preset="smoke", base_spec={},
                          search=search_module("constant").smoke_space(0.1), samples=3, seeds=5,
                          workers=1, storage="/tmp")
    space, num_samples = _param_space(plan)
    assert num_samples == 1
    assert space["seed"] == tune.grid_search([0, 1, 2, 3, 4])
    assert len(space["defense_config"]["grid_search"]) == 3


@pytest.mark.parametrize("cluster,workers,expected", [
    ({"CPU": 2.0}, 1, (1, 1.0, 0.0, 2)),
    ({"CPU": 2.0}, 4, (2, 1.0, 0.0, 1)),    # never more workers than CPUs
    ({"CPU": 64.0, "GPU": 8.0}, 4, (4, 4.0, 1.0, 2)),
    ({"CPU": 16.0, "GPU": 1.0}, 1, (1, 4.0, 1.0, 1)),
])
def test_concurrency_follows_cpus_and_gpus(cluster, workers, expected):
    r = plan_resources(cluster, workers)
    assert (r.workers, r.cpus_per_worker, r.gpus_per_worker, r.concurrency) == expected
