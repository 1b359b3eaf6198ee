"""``visadapt hsi train | eval | predict``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fraction_or_count(text: str):
    value = float(text)
    return int(value) if value >= 1 and value == int(value) and "." not in text else value


def _add_scene_args(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    g = p.add_argument_group("scene")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="a known dataset, read from --root by its usual file "
                                                               "names and .mat keys")
    g.add_argument("--root", help="folder holding the dataset's files (or data/, Matlab_data_format/ under it)")
    g.add_argument("--data", help="cube file: .mat (with --data-key), .npz (with --data-key) or .npy; (H, W, bands)")
    g.add_argument("--data-key", help="variable of the cube in --data")
    g.add_argument("--gt", help="ground-truth file (H, W), 0 = unlabelled, 1..K")
    g.add_argument("--gt-key", help="variable of the ground truth in --gt")
    g.add_argument("--class-names", type=lambda s: [x.strip() for x in s.split(",")], default=None,
                   help="comma-separated, label 1 first (known datasets have theirs)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    hsi = commands.add_parser("hsi", help="hyperspectral classification with LoLA-SpecViT",
                              description="Hyperspectral pixel classification with LoLA-SpecViT (timm model with "
                                          "LoRA) from .mat/.npy cubes to class maps.")
    sub = hsi.add_subparsers(dest="hsi_command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train one run and write results.json, the model and the class map",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--demo", action="store_true", help="generate a synthetic ~100-band scene and train a tiny "
                                                           "model on it (no download; about a minute on 2 CPU cores)")
    _add_scene_args(train)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    m = train.add_argument_group("model")
    m.add_argument("--model", default="lola_specvit_base", help="timm model: lola_specvit_base | _small | _tiny")
    m.add_argument("--lora-placement", choices=["none", "attn", "attn_mlp", "all"], default="all",
                   help="LoRA sites: attention; + MLP; + classifier head")
    m.add_argument("--plain-lora", action="store_true", help="plain LoRA at the block sites instead of the gated "
                                                             "LoRA with full-rank residual")
    m.add_argument("--lora-backend", choices=["builtin", "peft"], default="builtin",
                   help="peft: plain LoRA through peft.get_peft_model (needs --plain-lora), merged when saved")
    m.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the model's; 16 for base)")
    m.add_argument("--alpha", type=float, default=None, help="LoRA alpha, scale = alpha / rank")
    m.add_argument("--zero-init", action="store_true", help="LoRA B and R start at zero (standard LoRA) instead of "
                                                            "the release's global trunc-normal init")
    m.add_argument("--freeze", choices=["official", "standard", "full"], default="official",
                   help="official: only LoRA trains (the release); standard: only the LoRA-wrapped base linears are "
                        "frozen; full: everything trains")
    m.add_argument("--official-axis-permute", action="store_true", help="feed [B, H, W, C] as the release does")
    m.add_argument("--cycle-lora-scale", action="store_true", help="assumption: cycle the LoRA scale with the "
                                                                   "restarts (see visadapt.hyperspectral.schedule)")
    d = train.add_argument_group("data")
    d.add_argument("--pca", type=int, default=15, help="whitened PCA components")
    d.add_argument("--patch", type=int, default=15, help="patch size (odd)")
    d.add_argument("--padding", choices=["reflect", "zero"], default="reflect", help="zero = the release")
    d.add_argument("--input-norm", choices=["none", "patch", "band"], default="none",
                   help="per-sample z-score of patches; band = the release's (removes each band's patch mean)")
    d.add_argument("--train", type=_fraction_or_count, default=0.1, help="training pixels: fraction (<1) or count "
                                                                         "per class")
    d.add_argument("--val", type=_fraction_or_count, default=0, help="validation: fraction or count per class of "
                                                                     "the training pixels")
    d.add_argument("--split-seed", type=int, default=345)
    d.add_argument("--split-file", help="reuse the training pixels of another run (its split.json)")
    o = train.add_argument_group("optimisation")
    o.add_argument("--seed", type=int, default=345)
    o.add_argument("--epochs", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--grad-accum", type=int, default=2)
    o.add_argument("--lr", type=float, default=2e-5)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup-epochs", type=int, default=5)
    o.add_argument("--t0", type=float, default=10.0, help="first SGDR cycle (epochs)")
    o.add_argument("--t-mult", type=int, default=2)
    o.add_argument("--eta-min", type=float, default=1e-6)
    o.add_argument("--lora-lr-scale", type=float, default=1.0, help="λ on the cosine part of the LoRA group's lr "
                                                                     "(2.0 = the model file's unused scheduler)")
    o.add_argument("--label-smoothing", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=0.5)
    o.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto: fp16 autocast on CUDA, fp32 on CPU")
    o.add_argument("--checkpoint-every", type=int, default=None, help="batches (default: a tenth of the run)")
    o.add_argument("--eval-batch-size", type=int, default=256)
    o.add_argument("--no-class-map", action="store_true", help="skip predicting every pixel of the scene")
    o.add_argument("--workers", type=int, default=0)
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="OA / AA / κ of a trained run on its test pixels (or on another scene)")
    ev.add_argument("run", help="run folder written by `visadapt hsi train`")
    _add_scene_args(ev)
    ev.add_argument("--all-labelled", action="store_true", help="score every labelled pixel, not the run's test split")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", help="also write the scores to this file")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="class map of a cube with a trained run")
    pr.add_argument("run", help="run folder written by `visadapt hsi train`")
    pr.add_argument("--data", required=True, help="cube file (.mat, .npz, .npy), (H, W, bands)")
    pr.add_argument("--data-key", help="variable of the cube in --data")
    pr.add_argument("--gt", help="optional ground truth to show next to the map")
    pr.add_argument("--gt-key")
    pr.add_argument("--out", required=True, help="output PNG; the labels go next to it as .npy")
    pr.add_argument("--batch-size", type=int, default=256)
    pr.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    from .train import HSITrainConfig, train

    if args.demo:
        from .demo import run_demo

        r = run_demo(args.out, resume=args.resume)
        print(f"demo: OA {r['OA']:.2f}%  AA {r['AA']:.2f}%  κ {r['kappa']:.2f}")
        return 0
    if not (args.dataset and args.root) and not (args.data and args.gt):
        print("visadapt hsi train: pass --dataset and --root, or --data and --gt (with their keys), or --demo.",
              file=sys.stderr)
        return 2
    config = HSITrainConfig(
        dataset=args.dataset, root=args.root, data=args.data, data_key=args.data_key, gt=args.gt, gt_key=args.gt_key,
        class_names=args.class_names, model=args.model, lora_placement=args.lora_placement,
        lora_gate_residual=not args.plain_lora, lora_r=args.rank, lora_alpha=args.alpha,
        official_init=not args.zero_init, official_axis_permute=args.official_axis_permute,
        cycle_lora_scale=args.cycle_lora_scale, lora_backend=args.lora_backend, freeze=args.freeze,
        pca_components=args.pca, patch_size=args.patch, padding=args.padding, input_norm=args.input_norm, train=args.train, val=args.val,
        split_seed=args.split_seed, split_file=args.split_file, seed=args.seed, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, t0=args.t0, t_mult=args.t_mult, eta_min=args.eta_min,
        lora_lr_scale=args.lora_lr_scale, label_smoothing=args.label_smoothing, grad_clip=args.grad_clip or None,
        precision=args.precision, checkpoint_every=args.checkpoint_every, eval_batch_size=args.eval_batch_size,
        class_map=not args.no_class_map, workers=args.workers,
    )
    r = train(config, args.out, resume=args.resume)
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
    from visadapt.fewshot.data import save_json_atomic
    from visadapt.pipelines import HyperspectralPipeline

    from .data import Split

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

    from visadapt.pipelines import HyperspectralPipeline

    from .data import load_array, scene_from_arrays
    from .metrics import plot_class_map, save_class_map_png

    pipe = HyperspectralPipeline.from_pretrained(args.run)
    cube = load_array(args.data, args.data_key)
    out = pipe(cube, batch_size=args.batch_size)
    png = Path(args.out)
    k = len(pipe.class_names)
    if args.gt:
        scene = scene_from_arrays(cube, load_array(args.gt, args.gt_key), Path(args.data).stem, pipe.class_names)
        plot_class_map(out.class_map, scene.gt, pipe.class_names, png, title=Path(args.data).stem)
        save_class_map_png(out.class_map, k, png.with_name(png.stem + "_pred.png"))
    else:
        save_class_map_png(out.class_map, k, png)
    np.save(png.with_suffix(".npy"), out.class_map.astype(np.int16))
    counts = np.bincount(out.class_map.ravel(), minlength=k + 1)[1:]
    print(f"class map {out.class_map.shape[0]}×{out.class_map.shape[1]} written to {png} (labels in "
          f"{png.with_suffix('.npy')}); pixels per class: "
          + ", ".join(f"{n} {c}" for n, c in zip(pipe.class_names, counts)))
    return 0
