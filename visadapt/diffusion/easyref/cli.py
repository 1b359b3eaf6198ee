"""``visadapt easyref train | eval | demo-data``: EasyRef's three training stages, its MRBench-style evaluation, and
a small synthetic dataset to try them offline.

The options are the fields of :class:`~visadapt.diffusion.easyref.config.EasyRefTrainConfig` and
:class:`~visadapt.diffusion.easyref.config.EasyRefEvalConfig`. torch, diffusers and transformers are imported when a
command runs, so ``--help`` answers at once. Several GPUs train with data parallelism (``--batch-size`` is global)::

    accelerate launch --multi_gpu --num_processes 8 -m visadapt.cli easyref train --stage 1 --batch-size 64 ...

and stages 2-3, as the official runs, with DeepSpeed ZeRO-2 (``pip install -e ".[deepspeed]"``; the config holds the
official settings, the run's ``--grad-accum`` / ``--grad-clip`` fill in the rest)::

    accelerate launch --config_file configs/accelerate_easyref_zero2.yaml -m visadapt.cli easyref train --stage 2 \
        --batch-size 32 ...
"""

from __future__ import annotations

import argparse

from visadapt.utils.cli import (
    AT_LEAST_1,
    SEED,
    HelpFormatter,
    Range,
    add_config_arguments,
    add_train_command,
    config_from_args,
    ranged,
)

from .config import EasyRefEvalConfig, EasyRefTrainConfig


def add_commands(commands: argparse._SubParsersAction) -> None:
    easyref = commands.add_parser("easyref", help="train and evaluate EasyRef (multi-reference image adapter)",
                                  description="EasyRef for SDXL: a multimodal LLM reads a group of reference images "
                                              "and the prompt; 64 reference tokens condition the UNet through "
                                              "decoupled cross-attention. Three training stages, then evaluation "
                                              "against each group's held-back image (CLIP-I, CLIP-T, DINO-I).")
    sub = easyref.add_subparsers(dest="easyref_command", metavar="COMMAND", required=True)
    add_train_command(sub, EasyRefTrainConfig, _train,
                      help="train one stage (1 alignment, 2 single reference, 3 multi reference); writes the "
                           "adapter in our layout and the official one")
    ev = sub.add_parser("eval", help="generate for each group's held-back image and score CLIP-I, CLIP-T, DINO-I",
                        formatter_class=HelpFormatter)
    ev.add_argument("--out", required=True, help="folder for results.json and grid.png")
    add_config_arguments(ev, EasyRefEvalConfig)
    ev.set_defaults(func=_eval)
    demo = sub.add_parser("demo-data", help="write a small synthetic folder of image groups (coloured shapes, "
                                            "captioned) to try train and eval offline", formatter_class=HelpFormatter)
    demo.add_argument("--out", required=True, help="new (or empty) folder for the groups")
    demo.add_argument("--groups", type=ranged(int, AT_LEAST_1), default=3, help="subjects (one folder each)")
    # a group needs one reference and its held-back target
    demo.add_argument("--per-group", type=ranged(int, Range(2)), default=4,
                      help="images per subject (the last is held back by eval)")
    demo.add_argument("--size", type=ranged(int, Range(16, 4096)), default=48, help="image side in pixels")
    demo.add_argument("--seed", type=ranged(int, SEED), default=0, help="seed of the shapes' places and sizes")
    demo.set_defaults(func=_demo_data)


def _train(args: argparse.Namespace) -> int:
    from .train import train_easyref

    r = train_easyref(config_from_args(EasyRefTrainConfig, args), args.out, resume=args.resume)
    print(f"EasyRef stage {r['stage']}: loss on the evaluation batch {r['eval_loss_before']:.4f} → "
          f"{r['eval_loss_after']:.4f} after {r['steps']} steps; adapter in {args.out}: "
          + ", ".join(r["adapter_files"].values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval import evaluate_easyref, format_results

    r = evaluate_easyref(config_from_args(EasyRefEvalConfig, args), args.out)
    print(f"EasyRef on {len(r['groups'])} groups: {format_results(r)}; results.json and grid.png in {args.out}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from visadapt.utils import staged_dir

    from .data import write_demo_groups

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: it already holds files; pass a new or empty folder.")
    if args.groups < 1 or args.per_group < 2 or args.size < 16:
        raise ValueError("--groups must be >= 1, --per-group >= 2 (references and a held-back target), --size >= 16.")
    with staged_dir(out) as stage:
        write_demo_groups(stage, n_groups=args.groups, per_group=args.per_group, size=args.size, seed=args.seed)
    print(f"{args.groups} groups of {args.per_group} captioned images in {out}")
    return 0
