"""``visadapt fewshot train | eval | zeroshot | report``.

The options of ``train`` are the fields of :class:`visadapt.fewshot.config.TrainConfig`. Task modules (torch,
open_clip, peft) are imported when a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visadapt.utils.cli import (
    AT_LEAST_1,
    HelpFormatter,
    add_report_command,
    add_train_command,
    config_from_args,
    demo_overrides,
    ranged,
    typed_by_user,
)

from .config import DATASET_NAMES, DEMO_MODEL, TEMPLATE, TrainConfig

# What --demo chooses itself: its world's data and the tiny CLIP pretrained on it.
_DEMO_FIXED = ("dataset", "root", "model", "pretrained", "eval_zeroshot_on", "fewshot_split")
_HELP = HelpFormatter


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--dataset", choices=DATASET_NAMES, required=required,
                   help="a CoOp dataset read from --root, or 'imagefolder'")
    p.add_argument("--root", required=required, help="folder holding the dataset folders (CoOp's $DATA), or the "
                                                      "image folder itself")


def add_commands(commands: argparse._SubParsersAction) -> None:
    fewshot = commands.add_parser("fewshot", help="few-shot CLIP classification with low-rank adapters",
                                  description="Few-shot CLIP adaptation under the CLIP-LoRA protocol.")
    sub = fewshot.add_subparsers(dest="fewshot_command", metavar="COMMAND", required=True)

    add_train_command(sub, TrainConfig, _train, help="train one few-shot run and write results, adapter and plots",
                      demo="run on the embedded demo world and tiny CLIP (no download, about a minute on a laptop "
                           "CPU); the other options still apply, except data and model")

    ev = sub.add_parser("eval", help="top-1 of a trained run on a dataset's test split", formatter_class=_HELP)
    ev.add_argument("run", help="run folder written by `visadapt fewshot train`")
    _add_data_args(ev, required=False)
    ev.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=256, help="images per batch")
    ev.set_defaults(func=_eval)

    zs = sub.add_parser("zeroshot", help="zero-shot top-1 of an open_clip model on a dataset's test split",
                        formatter_class=_HELP)
    zs.add_argument("--model", default="ViT-B-16",
                    help=f"open_clip architecture, local-dir:PATH, hf-hub:ORG/REPO or {DEMO_MODEL}")
    zs.add_argument("--pretrained", default=None,
                    help="open_clip tag or checkpoint file; none: random weights (default: 'openai' for OpenAI "
                         "architectures, else none)")
    _add_data_args(zs)
    zs.add_argument("--template", default=TEMPLATE, help="prompt of each class name")
    zs.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=256, help="images per batch")
    zs.set_defaults(func=_zeroshot)

    add_report_command(sub, _report, help="accuracy-vs-shots plot and method table from several runs",
                       runs="run folders (searched recursively for results.json; runs of other tasks are skipped)",
                       out="folder for report.md and accuracy_vs_shots.png")


def default_pretrained(model: str, pretrained: str | None) -> str | None:
    """``openai`` is the default weights of the default architecture only: a local or hub model, or the demo CLIP,
    carries its own weights; ``none`` means random weights."""
    if pretrained is not None:
        return None if pretrained.lower() == "none" else pretrained
    own_weights = model == DEMO_MODEL or model.startswith(("local-dir:", "hf-hub:"))
    return None if own_weights else "openai"


def _train(args: argparse.Namespace) -> int:
    if args.demo:
        return _train_demo(args)
    if not (typed_by_user(args, "dataset") and typed_by_user(args, "root")) and not args.config:
        print("visadapt fewshot train: --dataset and --root are required (or --demo).", file=sys.stderr)
        return 2
    config = config_from_args(TrainConfig, args)
    if typed_by_user(args, "model") and not typed_by_user(args, "pretrained"):
        config.pretrained = default_pretrained(config.model, None)

    from .train import train

    results = train(config, args.out, resume=args.resume)
    print(f"{results['method']} {results['shots']}-shot top-1 {results['top1']:.2f}% "
          f"(zero-shot {results['zeroshot_top1']:.2f}%); results in {args.out}")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, resume=args.resume,
                    **demo_overrides(args, TrainConfig, _DEMO_FIXED, "data and model"))


def _eval(args: argparse.Namespace) -> int:
    from .data import load_split
    from .pipeline import FewShotCLIPPipeline

    saved = Path(args.run) / "run_config.json"
    run = json.loads(saved.read_text()) if saved.exists() else {}
    dataset, root = args.dataset or run.get("dataset"), args.root or run.get("root")
    if not (dataset and root):
        print("visadapt fewshot eval: pass --dataset and --root (the run folder does not name them).",
              file=sys.stderr)
        return 2
    pipe = FewShotCLIPPipeline.from_pretrained(args.run)
    split = load_split(dataset, root)
    print(f"{dataset} test top-1: {pipe.evaluate(split.test, split.classnames, args.batch_size):.2f}%")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from .data import load_split
    from .evaluate import ClipClassifier, top1
    from .model import load_clip

    pretrained = default_pretrained(args.model, args.pretrained)
    bundle = load_clip(args.model, pretrained)
    split = load_split(args.dataset, args.root)
    acc = top1(ClipClassifier(bundle.model), bundle.tokenizer, split.test, split.classnames, bundle.preprocess_val,
               template=args.template, batch_size=args.batch_size)
    print(f"{args.dataset} zero-shot top-1 ({args.model}, {pretrained}): {acc:.2f}%")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    out, skipped = write_report(args.runs, args.out)
    for run in skipped:
        print(f"skipped {run}: not a few-shot run")
    print(f"wrote {out / 'report.md'} and {out / 'accuracy_vs_shots.png'}")
    return 0
