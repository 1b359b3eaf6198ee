"""``visadapt fewshot train | eval | zeroshot | report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model import DEMO_MODEL, METHODS, TEMPLATE, TOWERS


def _csv(kind=str):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from .data import DATASETS

    p.add_argument("--dataset", choices=sorted(DATASETS), required=required,
                   help="a CoOp dataset read from --root, or 'imagefolder' (root/train/<class>/*, root/test/<class>/*"
                        ", or one folder of class sub-folders)")
    p.add_argument("--root", required=required, help="folder holding the dataset folders (CoOp's $DATA), or the "
                                                      "image folder itself")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (ViT-B-16), local-dir:PATH, "
                                                       f"hf-hub:ORG/REPO, or {DEMO_MODEL} (default: %(default)s)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or local checkpoint file; 'none' for "
                                                          "random weights (default: %(default)s)")


def _pretrained(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def add_commands(commands: argparse._SubParsersAction) -> None:
    fewshot = commands.add_parser("fewshot", help="few-shot CLIP classification with low-rank adapters",
                                  description="Few-shot CLIP adaptation under the CLIP-LoRA protocol.")
    sub = fewshot.add_subparsers(dest="fewshot_command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train one few-shot run and write results, adapter and plots",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--demo", action="store_true", help="run on the embedded demo world and tiny CLIP (no "
                                                           "download, about a minute on a laptop CPU)")
    _add_data_args(train, required=False)
    _add_model_args(train)
    train.add_argument("--out", required=True, help="run folder (results.json, adapter/, lora/, plots)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.add_argument("--shots", type=int, default=16)
    train.add_argument("--seed", type=int, default=1)
    method = train.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="lora", help="CLIP-LoRA, Block-LoRA or Comp-LoRA")
    method.add_argument("--peft-config", help="JSON peft config (any peft method: DoRA, VeRA, …); replaces "
                                              "--method")
    method.add_argument("--rank", type=int, default=2)
    method.add_argument("--alpha", type=float, default=1.0, help="scale = alpha / sqrt(rank)")
    method.add_argument("--dropout", type=float, default=0.25)
    method.add_argument("--parts", type=_csv(), default=["q", "k", "v"], help="attention projections: q,k,v,o")
    method.add_argument("--towers", type=_csv(), default=list(TOWERS), help="vision,text")
    method.add_argument("--layers", type=_csv(int), default=None, help="block indices (default: all)")
    method.add_argument("--n-blocks", type=int, default=8, help="Block-LoRA input chunks")
    method.add_argument("--block-mode", choices=["input_split", "rank_split"], default="input_split")
    method.add_argument("--comp-k", type=lambda s: float(s) if "." in s else int(s), default=0.5,
                        help="Comp-LoRA protected directions: int count or energy fraction")
    method.add_argument("--comp-side", choices=["out", "in", "both"], default="out")
    method.add_argument("--comp-mode", choices=["project", "init_only"], default="project")
    method.add_argument("--glad", action="store_true", help="GLAD's regularised gradient (two passes per step)")
    method.add_argument("--glad-rho", type=float, default=0.05)
    method.add_argument("--glad-alpha", type=float, default=0.8)
    method.add_argument("--glad-rule", choices=["interp", "project"], default="interp")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--weight-decay", type=float, default=1e-2)
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--iters", type=int, default=None, help="gradient steps (default: 500 × shots)")
    opt.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                     help="auto: fp16 autocast on CUDA, fp32 on CPU")
    opt.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop lower area bound")
    opt.add_argument("--workers", type=int, default=4, help="data-loading processes")
    opt.add_argument("--checkpoint-every", type=int, default=None, help="steps (default: a tenth of the run)")
    evals = train.add_argument_group("evaluation")
    evals.add_argument("--template", default=TEMPLATE)
    evals.add_argument("--logit-scale", type=lambda s: None if s == "model" else float(s), default=100.0,
                       help="logits = scale · cos; 'model' uses the model's learned scale")
    evals.add_argument("--eval-zeroshot-on", nargs="*", default=[], metavar="DATASET",
                       help="forgetting: zero-shot top-1 on these datasets (CoOp names under --root, or image "
                            "folders) with and without the adapter")
    evals.add_argument("--sampling-order", choices=["clip-lora", "coop"], default="clip-lora",
                       help="few-shot draw order of val and train subsets")
    evals.add_argument("--fewshot-split", help="reuse the shots of another run (its fewshot_split.json)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="top-1 of a trained run on a dataset's test split")
    ev.add_argument("run", help="run folder written by `visadapt fewshot train`")
    _add_data_args(ev, required=False)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.set_defaults(func=_eval)

    zs = sub.add_parser("zeroshot", help="zero-shot top-1 of an open_clip model on a dataset's test split")
    _add_model_args(zs)
    _add_data_args(zs)
    zs.add_argument("--template", default=TEMPLATE)
    zs.add_argument("--batch-size", type=int, default=256)
    zs.set_defaults(func=_zeroshot)

    report = sub.add_parser("report", help="accuracy-vs-shots plot and method table from several runs")
    report.add_argument("runs", nargs="+", help="run folders (searched recursively for results.json)")
    report.add_argument("--out", required=True, help="folder for report.md and accuracy_vs_shots.png")
    report.set_defaults(func=_report)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    if args.demo:
        from .demo import run_demo

        return run_demo(args.out, method=args.method, resume=args.resume, glad=args.glad)
    if not (args.dataset and args.root):
        print("visadapt fewshot train: --dataset and --root are required (or --demo).", file=sys.stderr)
        return 2
    config = TrainConfig(
        dataset=args.dataset, root=args.root, model=args.model, pretrained=_pretrained(args.pretrained),
        shots=args.shots, seed=args.seed, method=args.method, peft_config=args.peft_config, r=args.rank,
        alpha=args.alpha, dropout=args.dropout, parts=args.parts, towers=args.towers, layers=args.layers,
        n_blocks=args.n_blocks, block_mode=args.block_mode, comp_k=args.comp_k, comp_side=args.comp_side,
        comp_mode=args.comp_mode, glad=args.glad, glad_rho=args.glad_rho, glad_alpha=args.glad_alpha,
        glad_rule=args.glad_rule, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        iters=args.iters, template=args.template, logit_scale=args.logit_scale, crop_scale_min=args.crop_scale_min,
        precision=args.precision,
        sampling_order=args.sampling_order, fewshot_split=args.fewshot_split,
        eval_zeroshot_on=args.eval_zeroshot_on, checkpoint_every=args.checkpoint_every, workers=args.workers,
    )
    results = train(config, args.out, resume=args.resume)
    print(f"{results['method']} {results['shots']}-shot top-1 {results['top1']:.2f}% "
          f"(zero-shot {results['zeroshot_top1']:.2f}%); results in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visadapt.pipelines import FewShotCLIPPipeline

    from .data import load_split

    run = json.loads((Path(args.run) / "run_config.json").read_text()) \
        if (Path(args.run) / "run_config.json").exists() else {}
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

    bundle = load_clip(args.model, _pretrained(args.pretrained))
    split = load_split(args.dataset, args.root)
    acc = top1(ClipClassifier(bundle.model), bundle.tokenizer, split.test, split.classnames, bundle.preprocess_val,
               template=args.template, batch_size=args.batch_size)
    print(f"{args.dataset} zero-shot top-1 ({args.model}, {args.pretrained}): {acc:.2f}%")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.runs, args.out)
    print(f"wrote {out / 'report.md'} and {out / 'accuracy_vs_shots.png'}")
    return 0
