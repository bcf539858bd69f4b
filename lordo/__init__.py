"""lordo: LoRDO, distributed low-rank optimization with infrequent communication.

    import lordo
    opt = lordo.make_optimizer("lordo", model, lr=3e-3, rank=8, sync_every=16)   # drop-in optimizer
    run = lordo.train(method="lordo", preset="tiny", workers=4, steps=300)       # a cached training run
"""

import importlib

# Each public name, and the module it lives in. Loaded when first asked for: the optimizer needs nothing but
# torch, the training pipeline brings the data, the config YAML..., and `lordo --help` none of them.
_HOMES = {
    "DEFAULTS": "optim", "METHODS": "optim", "LoRDO": "optim", "make_optimizer": "optim", "split_params": "optim",
    "init_distributed": "comm", "run_simulated": "comm",
    "TrainConfig": "config", "load_config": "config",
    "train": "launch", "Run": "runs",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lordo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lordo.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
