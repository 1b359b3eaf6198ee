"""One process of a DeepSpeed run of the toy trainer of tests/test_training.py, started by tests/test_zero.py with
``accelerate launch --use_deepspeed``: ``python zero_worker.py OUT [--resume] [--stop-at STEP] [--grad-accum N]
[--grad-clip C] [--steps N] [--checkpoint-every N] [--no-dropout]``. The main process writes ``zero.json``
(results, the losses, the engine's type, ZeRO stage and optimizer steps); exit status 3: stopped by --stop-at (a
Ctrl-C)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from test_training import Blobs, ToyConfig, ToyTrainer  # tests/ is the script's folder


class EvenBlobs(Blobs):
    """32 of the 39 blobs: every batch of 8 splits evenly over 2 processes (accelerate skips a short batch in the
    middle of a split loader, which would shift the steps)."""

    def __init__(self) -> None:
        super().__init__()
        keep = torch.cat([torch.arange(16), torch.arange(20, 36)])
        self.x, self.y = self.x[keep], self.y[keep]


class ZeroToyTrainer(ToyTrainer):
    def setup(self) -> None:
        super().setup()
        self.train_set = EvenBlobs()


def main() -> int:
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    torch.set_num_threads(1)
    # DeepSpeed's shared-memory all-reduce is a CPU speed-up that compiles C++ on first use (about 100 s on two
    # cores); without it the collectives go through torch.distributed (gloo), as where the op cannot build.
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--grad-clip", type=float)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--no-dropout", dest="dropout", action="store_false")
    parser.add_argument("--easyref", metavar="DATA", help="train EasyRef stage 2 (tiny SDXL + tiny Qwen2-VL) instead")
    parser.add_argument("--precision", default="no")
    args = parser.parse_args()
    losses = []

    def record(step: int, facts: dict) -> None:
        losses.append(facts["loss"])
        if step == args.stop_at:
            raise KeyboardInterrupt

    if args.easyref:
        trainer = easyref_trainer(args, record)
    else:
        cfg = ToyConfig(grad_accum=args.grad_accum, grad_clip=args.grad_clip, steps=args.steps,
                        precision=args.precision, checkpoint_every=args.checkpoint_every, dropout=args.dropout)
        trainer = ZeroToyTrainer(cfg, args.out, resume=args.resume, callbacks=[record])
    try:
        results = trainer.run()
    except KeyboardInterrupt:
        return 3
    if trainer.accelerator.is_main_process:
        engine = trainer.model
        facts = {"engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
                 "optimizer_steps": engine.global_steps, "losses": losses}
        (Path(args.out) / "zero.json").write_text(json.dumps({**results, **facts}))
    return 0


def easyref_trainer(args: argparse.Namespace, record):
    """EasyRef stage 2 (the whole MLLM and a UNet LoRA train) on the tiny models, from a random stage 1."""
    import warnings

    from test_easyref_train import TINY

    from visadapt.diffusion.easyref_config import EasyRefTrainConfig
    from visadapt.diffusion.easyref_train import EasyRefTrainer

    warnings.filterwarnings("ignore", "Stage 2 without --init")
    tiny = {**TINY, "steps": args.steps, "grad_accum": args.grad_accum, "precision": args.precision,
            "checkpoint_every": args.checkpoint_every}
    cfg = EasyRefTrainConfig(stage=2, data=args.easyref, lora_rank=4, **tiny)
    return EasyRefTrainer(cfg, args.out, resume=args.resume, callbacks=[record])


if __name__ == "__main__":
    sys.exit(main())
