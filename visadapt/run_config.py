"""What every training run shares: :class:`RunConfig`, the options :class:`visadapt.training.Trainer` reads, declared
once with their command-line help. Each task's config extends it (``TrainConfig(RunConfig)``); a task whose recipe
fixes another default (LoRAT's batch 128, LoLA-SpecViT's seed 345) declares that with :func:`recipe_default`, which
keeps the shared help and type. Importing this module imports no torch, so the commands answer ``--help`` at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from visadapt.utils.cli import AT_LEAST_1, NON_NEGATIVE, SEED, check_config_keys, check_ranges, option

PRECISIONS = ("auto", "no", "fp16", "bf16")
RUN_GROUP = "run"

_Config = TypeVar("_Config", bound="RunConfig")


@dataclass
class RunConfig:
    """The training loop's settings, shared by every task (``visadapt <task> train`` lists them under "run")."""

    seed: int = option(1, "seed of everything random in the run: data draw, weight init, batch order, augmentation, "
                       "dropout, noise", group=RUN_GROUP, valid=SEED)
    batch_size: int = option(32, "examples per micro-batch, global (split over the processes)", group=RUN_GROUP,
                             valid=AT_LEAST_1)
    grad_accum: int = option(1, "micro-batches per optimizer step", group=RUN_GROUP, valid=AT_LEAST_1)
    grad_clip: Optional[float] = option(None, "gradient-norm clipping (none or 0: off)", group=RUN_GROUP,
                                        valid=NON_NEGATIVE)
    precision: str = option("auto", "autocast dtype: auto = fp16 on CUDA and fp32 on CPU; no = fp32",
                            choices=PRECISIONS, group=RUN_GROUP)
    checkpoint_every: Optional[int] = option(None, "micro-batches between checkpoints (none: a tenth of the run)",
                                             group=RUN_GROUP, valid=AT_LEAST_1)
    workers: int = option(0, "data-loading processes", group=RUN_GROUP, valid=NON_NEGATIVE)

    def __post_init__(self) -> None:
        check_ranges(self)  # the declared ranges: the same refusal from Python and --config files as on the CLI

    def to_json(self) -> dict:
        """What ``run_config.json`` records (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls: type[_Config], data: dict, source: str = "run_config.json") -> _Config:
        """The config a ``run_config.json`` describes; a renamed or unknown key stops with the name to use."""
        check_config_keys(cls, data, source)
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def recipe_default(name: str, value: Any, note: str = "") -> Any:
    """A task's own default for the shared option ``name`` (its recipe's value), with the shared help (and
    ``note`` appended in brackets, e.g. what ``none`` means in this task)."""
    shared = {f.name: f for f in dataclasses.fields(RunConfig)}[name]
    meta = shared.metadata
    help_text = meta["help"] + (f" ({note})" if note else "")
    return option(value, help_text, flag=meta["flag"], choices=meta["choices"], group=meta["group"],
                  parse=meta["parse"], valid=meta["valid"])
