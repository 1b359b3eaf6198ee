"""One process of a 2-process run of the toy trainer of tests/test_training.py (39 blobs in batches of 8: each
epoch ends with a batch of 7), started by tests/test_zero.py with ``accelerate launch``.

``python zero_worker.py OUT [--resume] [--stop-at STEP] [--grad-accum N] [--grad-clip C] [--steps N]
[--checkpoint-every N] [--no-dropout]`` under ``--use_deepspeed``: the main process writes ``zero.json`` (results,
the losses, the engine's type, ZeRO stage and optimizer steps); exit status 3: stopped by --stop-at (a Ctrl-C).
``--shots STEP`` (plain DDP): a run, then one cut at STEP and resumed, each process writing ``shots-<rank>.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from test_training import ToyConfig, ToyTrainer  # tests/ is on PYTHONPATH (tests/test_zero.py's launcher)


def main() -> int:
    torch.set_num_threads(1)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

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
    parser.add_argument("--shots", type=int, metavar="STEP", help="a run, then one cut at STEP and resumed, each "
                        "process writing the shares it trained on and the steps it counted")
    args = parser.parse_args()
    if args.shots:
        return shots(args)
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
        trainer = ToyTrainer(cfg, args.out, resume=args.resume, callbacks=[record])
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


class ShareLog(ToyTrainer):
    """The toy, recording the size of each share it trains on (one per step)."""

    def setup(self) -> None:
        super().setup()
        self.shares: list[int] = []

    def compute_loss(self, batch) -> torch.Tensor:
        self.shares.append(len(batch[1]))
        return super().compute_loss(batch)


def shots(args: argparse.Namespace) -> int:
    """Three runs in one launch: straight, cut at ``--shots`` (a Ctrl-C), resumed. Each process writes
    ``shots-<rank>.json``: per run, the share sizes it trained on and the steps its trainer counted."""
    cfg = ToyConfig(steps=args.steps, precision="no", checkpoint_every=args.checkpoint_every, dropout=args.dropout)
    out, facts = Path(args.out), {}

    for name, resume, stop_at in (("straight", False, None), ("cut", False, args.shots), ("cut", True, None)):
        steps: list[int] = []
        trainer = ShareLog(cfg, out / name, resume=resume, callbacks=[_counter(steps, stop_at)])
        try:
            trainer.run()
        except KeyboardInterrupt:
            pass
        trainer.accelerator.wait_for_everyone()  # the main process has written the checkpoint the next run reads
        facts[name + ("-resumed" if resume else "")] = {"shares": trainer.shares, "steps": steps}
    rank = trainer.accelerator.process_index
    (out / f"shots-{rank}.json").write_text(json.dumps({**facts, "num_processes": trainer.accelerator.num_processes}))
    return 0


def _counter(steps: list[int], stop_at: int | None):
    """A step callback that appends each step to ``steps`` and stops at ``stop_at`` (a Ctrl-C)."""

    def count(step: int, record: dict) -> None:
        steps.append(step)
        if step == stop_at:
            raise KeyboardInterrupt

    return count


def easyref_trainer(args: argparse.Namespace, record):
    """EasyRef stage 2 (the whole MLLM and a UNet LoRA train) on the tiny models, from a random stage 1."""
    import warnings

    from test_easyref_train import TINY

    from visadapt.diffusion.easyref.config import EasyRefTrainConfig
    from visadapt.diffusion.easyref.train import EasyRefTrainer

    warnings.filterwarnings("ignore", "Stage 2 without --init")
    tiny = {**TINY, "steps": args.steps, "grad_accum": args.grad_accum, "precision": args.precision,
            "checkpoint_every": args.checkpoint_every}
    cfg = EasyRefTrainConfig(stage=2, data=args.easyref, r=4, **tiny)
    return EasyRefTrainer(cfg, args.out, resume=args.resume, callbacks=[record])


if __name__ == "__main__":
    sys.exit(main())
