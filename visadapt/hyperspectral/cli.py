"""``visadapt hsi train | eval | predict``.

The options of ``train`` are the fields of :class:`visadapt.hyperspectral.config.HSITrainConfig`. Task modules
(torch, timm) are imported when a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visadapt.utils.cli import (
    AT_LEAST_1,
    HelpFormatter,
    add_train_command,
    config_from_args,
    demo_overrides,
    ranged,
)

from .config import DATASET_NAMES, HSITrainConfig

_HELP = HelpFormatter
_DEMO_FIXED = ("dataset", "root", "data", "data_key", "gt", "gt_key", "class_names")


def _add_scene_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scene")
    g.add_argument("--dataset", choices=DATASET_NAMES, help="a known dataset, read from --root by its usual file "
                                                            "names and .mat keys")
    g.add_argument("--root", help="folder holding the dataset's files (or data/, Matlab_data_format/ under it)")
    g.add_argument("--data", help="cube file (H, W, bands): .mat, .npz or .npy")
    g.add_argument("--data-key", help="variable of the cube in --data (needed when the file holds several)")
    g.add_argument("--gt", help="ground-truth file (H, W), 0 = unlabelled, 1..K")
    g.add_argument("--gt-key", help="variable of the ground truth in --gt (needed when the file holds several)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    hsi = commands.add_parser("hsi", help="hyperspectral classification with LoLA-SpecViT",
                              description="Hyperspectral pixel classification with LoLA-SpecViT (timm model with "
                                          "LoRA) from .mat/.npy cubes to class maps.")
    sub = hsi.add_subparsers(dest="hsi_command", metavar="COMMAND", required=True)

    add_train_command(sub, HSITrainConfig, _train,
                      help="train one run and write results.json, the model and the class map",
                      demo="generate a synthetic ~100-band scene and train a tiny model on it (no download; about a "
                           "minute on 2 CPU cores); the other options still apply, except the scene's")

    ev = sub.add_parser("eval", help="OA / AA / κ of a trained run on its test pixels (or on another scene)",
                        formatter_class=_HELP)
    ev.add_argument("run", help="run folder written by `visadapt hsi train`")
    _add_scene_args(ev)
    ev.add_argument("--all-labelled", action="store_true", help="score every labelled pixel, not the run's test split")
    ev.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=256, help="pixels per batch")
    ev.add_argument("--json", help="also write the scores to this file")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="class map of a cube with a trained run", formatter_class=_HELP)
    pr.add_argument("run", help="run folder written by `visadapt hsi train`")
    pr.add_argument("--data", required=True, help="cube file (.mat, .npz, .npy), (H, W, bands)")
    pr.add_argument("--data-key", help="variable of the cube in --data (needed when the file holds several)")
    pr.add_argument("--gt", help="ground truth to draw next to the prediction")
    pr.add_argument("--gt-key", help="variable of the ground truth in --gt (needed when the file holds several)")
    pr.add_argument("--out", required=True, help="the figure (PNG: the class map with its legend, next to --gt if "
                                                 "given); the bare map goes beside it as <name>_pred.png and the "
                                                 "labels as <name>.npy")
    pr.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=256, help="pixels per batch")
    pr.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    if args.demo:
        from .demo import run_demo

        r = run_demo(args.out, resume=args.resume, **demo_overrides(args, HSITrainConfig, _DEMO_FIXED, "scene"))
        print(f"demo: OA {r['OA']:.2f}%  AA {r['AA']:.2f}%  κ {r['kappa']:.2f}")
        return 0
    from .train import train

    r = train(config_from_args(HSITrainConfig, args), args.out, resume=args.resume)
    print(f"{r['dataset']}: OA {r['OA']:.2f}%  AA {r['AA']:.2f}%  κ {r['kappa']:.2f}; results in {args.out}")
    return 0


def _scene_for_run(args: argparse.Namespace, run: Path):
    from .data import load_scene

    saved = json.loads((run / "run_config.json").read_text()) if (run / "run_config.json").exists() else {}
    if args.dataset or args.data:
        return load_scene(args.dataset, args.root, data=args.data, data_key=args.data_key, gt=args.gt,
                          gt_key=args.gt_key), False
    if not (saved.get("dataset") or saved.get("data")):
        raise ValueError(f"{run} does not name its scene; pass --dataset/--root or --data/--gt.")
    return load_scene(saved.get("dataset"), saved.get("root"), data=saved.get("data"), data_key=saved.get("data_key"),
                      gt=saved.get("gt"), gt_key=saved.get("gt_key")), True


def _eval(args: argparse.Namespace) -> int:
    from visadapt.utils import save_json_atomic

    from .data import Split
    from .pipeline import HyperspectralPipeline

    run = Path(args.run)
    pipe = HyperspectralPipeline.from_pretrained(run)
    scene, same = _scene_for_run(args, run)
    pixels = None
    if same and not args.all_labelled and (run / "split.json").exists():
        pixels = Split.load(run / "split.json", scene.gt).test
    r = pipe.evaluate(scene.cube, scene.gt, pixels=pixels, batch_size=args.batch_size)
    which = "test pixels" if pixels is not None else "all labelled pixels"
    print(f"{scene.name} ({which}, {int(sum(r['support']))}): OA {r['OA']:.2f}%  AA {r['AA']:.2f}%  "
          f"κ {r['kappa']:.2f}")
    for name, acc in zip(pipe.class_names, r["per_class_accuracy"]):
        print(f"  {name}: {acc:.2f}%")
    if args.json:
        save_json_atomic({**r, "pixels": which}, args.json)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from visadapt.utils import atomic_path

    from .data import load_array, scene_from_arrays
    from .metrics import plot_class_map, save_class_map_png
    from .pipeline import HyperspectralPipeline

    figure = Path(args.out)
    if figure.suffix.lower() != ".png":
        raise ValueError(f"--out {figure}: name the figure's PNG file (e.g. map.png).")
    pipe = HyperspectralPipeline.from_pretrained(args.run)
    cube = load_array(args.data, args.data_key)
    name = Path(args.data).stem
    gt = None
    if args.gt:  # read before the long prediction, so a wrong path fails at once
        gt = scene_from_arrays(cube, load_array(args.gt, args.gt_key), name, pipe.class_names).gt
    out = pipe(cube, batch_size=args.batch_size)
    k = len(pipe.class_names)
    plot_class_map(out.class_map, gt, pipe.class_names, figure,
                   title=f"{name}: {out.class_map.shape[0]}×{out.class_map.shape[1]} pixels, {Path(args.run).name}")
    save_class_map_png(out.class_map, k, figure.with_name(figure.stem + "_pred.png"))
    with atomic_path(figure.with_suffix(".npy")) as tmp:
        np.save(tmp, out.class_map.astype(np.int16))
    counts = np.bincount(out.class_map.ravel(), minlength=k + 1)[1:]
    print(f"class map written to {figure} (bare map {figure.stem}_pred.png, labels {figure.with_suffix('.npy')}); "
          "pixels per class: " + ", ".join(f"{n} {c}" for n, c in zip(pipe.class_names, counts)))
    return 0
