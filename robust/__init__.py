"""Pure-PyTorch core: data, models, defenses, attacks, training, results. Imports no Ray."""
