"""lordo: LoRDO, distributed low-rank optimization with infrequent communication.

    import lordo
    opt = lordo.make_optimizer("lordo", model, lr=3e-3, rank=8, sync_every=16)   # drop-in optimizer
    run = lordo.train(method="lordo", preset="tiny", workers=4, steps=300)       # a cached training run
"""

from lordo.comm import init_distributed, run_simulated
from lordo.optim import DEFAULTS, METHODS, LoRDO, make_optimizer, split_params

__all__ = ["DEFAULTS", "METHODS", "LoRDO", "TrainConfig", "init_distributed", "load_config", "make_optimizer",
           "run_simulated", "split_params", "train", "Run"]


def __getattr__(name: str):
    # The trainer pulls in the data pipeline, the config YAML: import them only when asked for, so that the
    # optimizer needs nothing but torch.
    if name in ("train", "Run"):
        from lordo import trainer
        return getattr(trainer, name)
    if name in ("TrainConfig", "load_config"):
        from lordo import config
        return getattr(config, name)
    raise AttributeError(f"module 'lordo' has no attribute {name!r}")
