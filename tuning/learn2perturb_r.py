"""Search space of `learn2perturb-r` (Learn2Perturb-R, Jeddi et al. 2020, section 4.3):
the space of `learn2perturb` (theta learns from the regulariser only, so gamma
alone drives the noise growth).  Metric: EOT-PGD accuracy on the validation split."""
from tuning.learn2perturb import METRIC, MODE, smoke_space, space  # noqa: F401
