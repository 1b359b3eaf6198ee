"""``visadapt incremental train | eval | report``.

The options of ``train`` are the fields of :class:`visadapt.incremental.config.IncrementalConfig`. Task modules
(torch, timm) are imported when a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visadapt.utils.cli import (
    NON_NEGATIVE,
    HelpFormatter,
    add_report_command,
    add_train_command,
    config_from_args,
    demo_overrides,
    ranged,
    typed_by_user,
)

from .config import IncrementalConfig, official_recipe

# What --demo chooses itself: its world's data, schedule and backbone.
_DEMO_FIXED = ("official_recipe", "dataset", "root", "index_list", "cec_sessions", "backbone", "pretrained",
               "base_classes", "way", "sessions", "setting", "recipe")


def add_commands(commands: argparse._SubParsersAction) -> None:
    inc = commands.add_parser("incremental", help="few-shot class-incremental learning with CoACT",
                              description="Few-shot class-incremental learning (FSCIL, FSCIT) with CoACT: a LoRA "
                                          "student, an EMA teacher and prototype sessions.")
    sub = inc.add_subparsers(dest="incremental_command", metavar="COMMAND", required=True)

    add_train_command(sub, IncrementalConfig, _train,
                      help="run every session and write results.json, figures and the pipeline",
                      demo="a stream of textured shapes on the tiny demo CLIP's vision tower (no download, about "
                           "75 s of CPU time): CoACT next to naive fine-tuning and prototypes, seeds 1-3 (--seed N: "
                           "that seed only)",
                      resume="continue the interrupted run in --out (inside the session it stopped in, then the "
                             "later ones)")

    ev = sub.add_parser("eval", help="score a finished run after a session on its test images",
                        formatter_class=HelpFormatter)
    ev.add_argument("run", help="run folder written by `visadapt incremental train`")
    ev.add_argument("--session", type=ranged(int, NON_NEGATIVE), default=None, help="session (default: the last)")
    ev.add_argument("--root", help="where the dataset is now, if it moved")
    ev.add_argument("--json", help="also write the scores to this file")
    ev.set_defaults(func=_eval)

    add_report_command(sub, _report, help="put several runs side by side (table and per-session plot)",
                       runs="run folders (or folders holding runs)",
                       out="folder for report.md, sessions.png and runs.json")


def _train(args: argparse.Namespace) -> int:
    if args.demo:
        from .demo import run_demo, seed_words

        typed = demo_overrides(args, IncrementalConfig, _DEMO_FIXED,
                               "data, schedule and backbone and runs every recipe")
        summary = run_demo(args.out, resume=args.resume, overrides=typed)
        seeds = next(iter(summary.values()))["seeds"]
        n = len(seeds)
        print(f"\n{seed_words(seeds)}{': mean ± std' * (n > 1)}")
        print("recipe       avg acc        last acc       base forgetting  time")
        for name, r in summary.items():
            cells = [f"{r[k]:5.1f}" + (f" ± {r[k + '_std']:4.1f}" if n > 1 else " " * 7)
                     for k in ("average_accuracy", "last_accuracy", "base_forgetting")]
            print(f"{name:<12} {cells[0]}  {cells[1]}  {cells[2]}     {r['wall_time_s']:5.1f} s")
        print(f"Report: {Path(args.out) / 'report.md'}")
        return 0
    from .train import train

    r = train(_config(args), args.out, resume=args.resume)
    print(f"{r['dataset']} {r['setting']}: average {r['average_accuracy']:.2f}%, last {r['last_accuracy']:.2f}%, "
          f"base forgetting {r['base_forgetting']:.2f}; results in {args.out}")
    return 0


def _config(args: argparse.Namespace) -> IncrementalConfig:
    """The config of the command line; with --official-recipe, the code's per-dataset values fill every option the
    user did not type (the code itself lets them override the command line)."""
    config = config_from_args(IncrementalConfig, args)
    if not config.official_recipe:
        return config
    recipe = official_recipe(config.setting, config.dataset or "")
    if not recipe:
        raise ValueError(f"--official-recipe: the CoACT code has no {config.setting} settings for "
                         f"{config.dataset!r}; drop the flag and pass the options.")
    return config_from_args(IncrementalConfig, args, **{k: v for k, v in recipe.items() if not typed_by_user(args, k)})


def _eval(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from visadapt.utils import save_json_atomic

    from .data import load_dataset
    from .metrics import session_accuracy
    from .pipeline import IncrementalClassifierPipeline
    from .sessions import plan_for
    from .train import embed_all

    run = Path(args.run)
    saved = json.loads((run / "run_config.json").read_text()) if (run / "run_config.json").exists() else None
    if saved is None or not saved.get("dataset"):
        raise ValueError(f"{run}: not a run of `visadapt incremental train` on a dataset (demo runs are scored in "
                         "their results.json).")
    meta = json.loads((run / "pipeline.json").read_text())
    session = len(meta["seen_by_session"]) - 1 if args.session is None else args.session
    pipe = IncrementalClassifierPipeline.from_pretrained(run, session=session)
    data = load_dataset(saved["dataset"], args.root or saved["root"])
    plan = plan_for(saved["setting"], saved["dataset"], len(data.class_names), saved["base_classes"], saved["way"],
                    saved["sessions"])
    rows = np.flatnonzero(data.test.labels < plan.seen(session))
    feats, labels = embed_all(pipe.model.student, data.test.subset(rows), pipe.transform,
                              saved["eval_batch_size"], desc="test")
    # as training scored it: over every classifier row unless the run masked the unseen classes' rows
    weight = pipe.rows if saved.get("mask_unseen") else torch.cat([pipe.rows, pipe.model.classifier.weight[
        len(pipe.rows):]])
    with torch.no_grad():
        logits = pipe.model.logits(feats, weight)
    r = session_accuracy(logits.argmax(1).numpy(), labels.numpy(), plan, session)
    novel = f", novel {r['novel']:.2f}%" if r["novel"] is not None else ""
    print(f"session {session} ({r['classes_seen']} classes, {r['num_test']} test images): all {r['all']:.2f}%, "
          f"base {r['base']:.2f}%{novel}; all per batch (official) {r['all_per_batch']:.2f}%")
    if args.json:
        save_json_atomic(r, args.json)
    return 0


def _runs_below(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        found += sorted(q.parent for q in p.rglob("results.json") if "sessions" in json.loads(q.read_text())
                        and "plan" in json.loads(q.read_text()))
    return found


def _report(args: argparse.Namespace) -> int:
    from visadapt.utils import save_json_atomic, write_text_atomic

    from .metrics import plot_sessions
    from .train import run_report

    runs = _runs_below(args.runs)
    if not runs:
        raise ValueError(f"No incremental run (results.json with sessions) below {', '.join(args.runs)}.")
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    names = [str(r) for r in runs]
    out = Path(args.out)
    write_text_atomic(run_report(results, names).replace(" ![groups](groups.png)", ""), out / "report.md")
    plot_sessions({n: r["sessions"] for n, r in zip(names, results)}, out / "sessions.png")
    save_json_atomic({n: {k: r[k] for k in ("average_accuracy", "last_accuracy", "performance_drop",
                                            "base_forgetting")} for n, r in zip(names, results)}, out / "runs.json")
    print(f"{len(runs)} runs; report in {out / 'report.md'}")
    return 0
