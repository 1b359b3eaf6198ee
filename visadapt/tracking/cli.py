"""``visadapt track train | eval | run | report``: LoRAT visual object tracking.

The options of ``train`` are the fields of :class:`visadapt.tracking.config.TrackConfig`. Torch, timm and PyAV are
imported when a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from visadapt.utils.cli import (
    AT_LEAST_1,
    HelpFormatter,
    add_report_command,
    add_train_command,
    config_from_args,
    demo_overrides,
    ranged,
)

from .config import DataSpec, TrackConfig

# What --demo chooses itself: its world's data and the shipped backbone.
_DEMO_FIXED = ("data", "eval_data", "variant", "weights")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def add_commands(commands: argparse._SubParsersAction) -> None:
    track = commands.add_parser("track", help="visual object tracking with LoRAT",
                                description="Visual object tracking with LoRAT: a one-stream ViT tracker trained "
                                            "with LoRA (train, evaluate, run on a video, compare runs).")
    sub = track.add_subparsers(dest="track_command", metavar="COMMAND", required=True)
    add_train_command(sub, TrackConfig, _train,
                      help="train LoRA and the head on tracking datasets; writes the pipeline and, with "
                           "--eval-data, results.json and plots",
                      demo="a procedural video world on the shipped tiny ViT (no download, a few minutes on 2 CPU "
                           "cores): trains, tracks the held-out sequences and scores them next to a static box")

    _add_eval_command(sub)
    _add_run_command(sub)
    add_report_command(sub, _report, help="put evaluated runs side by side (table and one success plot)",
                       runs="run folders (or folders written by `track eval`)",
                       out="folder for report.md and success_plot.png")


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="track and score annotated sequences with a trained run or official weights",
                        formatter_class=HelpFormatter)
    ev.add_argument("model", nargs="?", help="run folder (or any TrackingPipeline.save_pretrained folder); "
                                             "omit it with --weights")
    ev.add_argument("--data", required=True, help="NAME:ROOT[:SPLIT], e.g. got10k:/data/GOT-10k:val")
    ev.add_argument("--variant", help="with --weights: the paper variant of an official checkpoint (B-224, …)")
    ev.add_argument("--weights", help="official LoRAT weight file (base.bin, large-378.bin, …)")
    ev.add_argument("--out", required=True, help="folder for results/<seq>.txt, results.json and success_plot.png")
    ev.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=16, help="sequences tracked in lockstep")
    ev.add_argument("--server-format", choices=("got10k", "trackingnet"), default=None,
                    help="also write the submission files and zip of that evaluation server under OUT/server "
                         "(test splits, annotated on the first frame only, are tracked but not scored here)")
    ev.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    ev.set_defaults(func=_eval)


def _add_run_command(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="track one object through a video file or a frame folder",
                         formatter_class=HelpFormatter)
    run.add_argument("video", help="video file (read with PyAV) or folder of frames (sorted by name)")
    run.add_argument("--box", required=True, help="the target in the first frame: x,y,w,h in pixels")
    run.add_argument("--model", help="run folder (or save_pretrained folder); omit it with --weights")
    run.add_argument("--variant", help="with --weights: the paper variant of an official checkpoint")
    run.add_argument("--weights", help="official LoRAT weight file")
    run.add_argument("--out", required=True, help="folder for boxes.txt and the annotated video (or frames)")
    run.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    run.set_defaults(func=_run)


def _train(args: argparse.Namespace) -> int:
    from .evaluate import STATIC

    if args.demo:
        from .demo import run_demo

        typed = demo_overrides(args, TrackConfig, _DEMO_FIXED, "data (a procedural video world) and backbone")
        results = run_demo(args.out, resume=args.resume, overrides=typed)
    else:
        from .train import train

        results = train(config_from_args(TrackConfig, args), args.out, resume=args.resume)
    if "tracker" in results:
        print(_table({"LoRAT": results["tracker"], STATIC: results[STATIC]}))
    print(f"Run in {args.out} ({results['wall_time_s']:.0f} s); report: {Path(args.out) / 'report.md'}")
    return 0


def _table(rows: dict) -> str:
    from .train import score_table

    return score_table(rows)


def _device(name):
    import torch

    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pipeline(model, variant, weights, device):
    from .pipeline import TrackingPipeline

    if weights:
        if not variant:
            raise ValueError("--weights needs --variant (B-224, B-378, L-224, L-378, g-224 or g-378).")
        if model:
            raise ValueError("Give either a run folder or --variant/--weights, not both.")
        return TrackingPipeline.from_official(variant, weights, device=device)
    if not model:
        raise ValueError("Give a run folder (written by `visadapt track train`), or --variant and --weights.")
    return TrackingPipeline.from_pretrained(model, device=device)


def _eval(args: argparse.Namespace) -> int:
    from visadapt.utils import save_json_atomic, write_text_atomic

    from .datasets import load_sequences
    from .evaluate import STATIC, evaluate_tracker

    spec = DataSpec.parse(args.data)
    pipe = _pipeline(args.model, args.variant, args.weights, _device(args.device))
    sequences = load_sequences(spec.name, spec.root, spec.split)
    out = Path(args.out)
    results = evaluate_tracker(pipe.tracker, sequences, out, args.batch_size, title=str(spec),
                               server=args.server_format)
    results = {"model": args.model or f"{args.variant}:{args.weights}", "eval_data": str(spec), **results}
    save_json_atomic(results, out / "results.json")
    header = (f"# LoRAT evaluation\n\n{results['model']} on {spec} ({results['sequences']} sequences, "
              f"{results['frames']} frames)\n\n")
    if "tracker" in results:
        table = _table({"LoRAT": results["tracker"], STATIC: results[STATIC]})
        write_text_atomic(f"{header}{table}\n\n![success plot](success_plot.png)\n", out / "report.md")
        print(table)
    else:
        note = "Annotated on the first frame only (a test split): tracked, not scored here; the server scores it."
        write_text_atomic(f"{header}{note}\n", out / "report.md")
        print(note)
    if "server_zip" in results:
        print(f"Submission for the {args.server_format} server: {out / results['server_zip']}")
    print(f"Results in {out}")
    return 0


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(map(math.isfinite, values)) or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"--box {text!r}: write x,y,w,h in pixels, finite numbers with w > 0 and h > 0, e.g. --box "
                         "40,30,60,45.")
    return values  # type: ignore[return-value]


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from visadapt.utils import atomic_path

    from .video import read_frames, write_annotated

    box = _parse_box(args.box)
    source = Path(args.video)
    frames, fps = read_frames(source)
    pipe = _pipeline(args.model, args.variant, args.weights, _device(args.device))
    output = pipe(frames, box)
    out = Path(args.out)
    written = write_annotated(frames, output.boxes, out, fps, as_video=source.is_file())
    with atomic_path(out / "boxes.txt") as tmp:
        np.savetxt(tmp, np.column_stack([output.boxes, output.scores]), fmt="%.2f,%.2f,%.2f,%.2f,%.4f",
                   header="x,y,w,h,score")
    print(f"{len(frames)} frames tracked; boxes in {out / 'boxes.txt'}, annotated {written}")
    return 0


def _evaluated(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no results.json; pass run folders of `track train` with --eval-data (or "
                         "--demo) or folders of `track eval`.")
    results = json.loads(path.read_text())
    if "tracker" not in results:
        raise ValueError(f"{path} holds no scores (a run without --eval-data, or a test split that only its server "
                         f"scores); score annotated data with `visadapt track eval {folder} --data …`.")
    return results


def _report(args: argparse.Namespace) -> int:
    import numpy as np

    from visadapt.utils import save_json_atomic, write_text_atomic

    from .evaluate import CURVES, STATIC
    from .metrics import plot_success_precision

    runs = [Path(r) for r in args.runs]
    results = {str(r): _evaluated(r) for r in runs}
    rows = {name: r["tracker"] for name, r in results.items()}
    first = next(iter(results.values()))
    rows[f"{STATIC} ({first.get('eval_data', '')})"] = first[STATIC]
    table = _table(rows)
    data = sorted({r.get("eval_data", "?") for r in results.values()})
    out = Path(args.out)
    plot_success_precision({n: {**r, **{k: np.asarray(r[k]) for k in CURVES}} for n, r in rows.items()},
                           out / "success_plot.png", ", ".join(data))
    note = "" if len(data) == 1 else "\n\nThe runs were scored on different data: " + ", ".join(data) + "."
    write_text_atomic(f"# LoRAT runs\n\nScored on {', '.join(data)}.{note}\n\n{table}\n\n"
                      "![success plot](success_plot.png)\n", out / "report.md")
    save_json_atomic({n: {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for n, r in rows.items()},
                     out / "runs.json")
    print(table)
    print(f"Report in {out / 'report.md'}")
    return 0
