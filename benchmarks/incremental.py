"""CoACT against naive per-session LoRA fine-tuning: time and peak memory per session, measured side by side; and
two measurements behind the demo's README passage.

    python benchmarks/incremental.py                       # the demo stream (tiny tower, 6 sessions)
    python benchmarks/incremental.py --epochs-base 2 --epochs-incremental 1
    python benchmarks/incremental.py --probe               # what the frozen demo tower reads of the pattern world
    python benchmarks/incremental.py --rescore runs/inc    # a finished demo, every classifier row a prototype

``--probe``: on the demo's images of seeds 1-3 (30 training and 20 test images a class), the frozen tower's nearest
class mean (cosine) and a linear probe (logistic regression on standardised features, Adam, 500 steps) for the 15
classes, the 3 shapes and the 5 texture kinds. ``--rescore``: each run of a finished ``--demo`` folder, scored on
all 15 classes with the encoder after session 0 and after the last session, every row the mean feature of the
training images the run saw (all of a base class, the shots of a later one): how good the encoder is, apart from
its classifier rows.

Each recipe runs the whole stream with the real trainer in a fresh child process (clean allocator, its own peak).
Time per session is the trainer's training wall time (forward, losses, backward, SGD; CoACT adds the teacher's EMA
and forward in session 0, and the base-session model's and the pretrained encoder's forwards later). Peak memory
is, on CUDA, the allocator's peak over the session's steps; on CPU, the process's resident size sampled after every
step (its maximum over the session). Ratios are CoACT / fine-tuning, session by session.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from visadapt.utils.measure import MiB, current_rss, device_name, run_child

MARKER = "@@incremental@@"


def worker(recipe: str, args: argparse.Namespace) -> dict:
    from visadapt.incremental.demo import demo_config, demo_data
    from visadapt.incremental.train import train

    peaks: list[float] = []

    def sample(step: int, record: dict) -> None:
        if step == 1:
            peaks.append(0.0)
        if torch.cuda.is_available():
            peaks[-1] = max(peaks[-1], torch.cuda.max_memory_allocated() / MiB)
            torch.cuda.reset_peak_memory_stats()
        else:
            peaks[-1] = max(peaks[-1], current_rss() / MiB)

    config = demo_config(recipe, epochs_base=args.epochs_base, epochs_incremental=args.epochs_incremental)
    with tempfile.TemporaryDirectory() as out:
        results = train(config, Path(out) / recipe, data=demo_data(), callbacks=[sample])
    return {"recipe": recipe, "train_s": [s["train_wall_time_s"] for s in results["sessions"]],
            "steps": [s["steps"] for s in results["sessions"]], "peak_mib": peaks,
            "all": [s["all"] for s in results["sessions"]]}


def _nearest_mean(train_x, train_y, test_x, test_y, classes: int, k: int | None = None) -> float:
    import torch.nn.functional as F

    rows = torch.stack([train_x[train_y == c][:k].mean(0) for c in range(classes)])
    guess = (F.normalize(test_x, dim=1) @ F.normalize(rows, dim=1).T).argmax(1)
    return 100 * (guess == test_y).float().mean().item()


def _linear_probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    import torch.nn.functional as F

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(500):
        optimizer.zero_grad()
        F.cross_entropy(probe((train_x - mean) / std), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * (probe((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


def probe() -> None:
    from visadapt.incremental.data import eval_transform
    from visadapt.incremental.demo import DEMO_CLASSES, DEMO_SEEDS, demo_data
    from visadapt.incremental.model import load_open_clip
    from visadapt.incremental.train import embed_all
    from visadapt.utils.worlds.models import DEMO_CLIP_DIR
    from visadapt.utils.worlds.shapes import PATTERN_KINDS, PATTERN_SHAPES

    tower = load_open_clip(f"local-dir:{DEMO_CLIP_DIR}", None)
    transform = eval_transform(tower.image_size, tower.mean, tower.std)
    shape = torch.tensor([PATTERN_SHAPES.index(c[0]) for c in DEMO_CLASSES])
    kind = torch.tensor([PATTERN_KINDS.index(c[1]) for c in DEMO_CLASSES])
    print("seed  labels  chance  nearest mean (5 shots)  nearest mean (30)  linear probe")
    for seed in DEMO_SEEDS:
        data = demo_data(seed)
        train_x, train_y = embed_all(tower.trunk, data.train, transform, 100)
        test_x, test_y = embed_all(tower.trunk, data.test, transform, 100)
        for name, to, n in (("class", None, len(DEMO_CLASSES)), ("shape", shape, 3), ("kind", kind, 5)):
            a, b = (train_y, test_y) if to is None else (to[train_y], to[test_y])
            five = f"{_nearest_mean(train_x, a, test_x, b, n, 5):22.1f}" if to is None else f"{'':>22}"
            print(f"{seed:4d}  {name:6s}  {100 / n:5.1f}%  {five}  {_nearest_mean(train_x, a, test_x, b, n):17.1f}  "
                  f"{_linear_probe(train_x, a, test_x, b, n):12.1f}")


def rescore(folder: Path) -> None:
    import numpy as np

    from visadapt.incremental.demo import demo_data
    from visadapt.incremental.pipeline import IncrementalClassifierPipeline
    from visadapt.incremental.sessions import plan_for, read_index_list, session_rows
    from visadapt.incremental.train import embed_all

    runs = sorted(folder.glob("*/seed_*/results.json"))
    if not runs:
        raise SystemExit(f"--rescore {folder}: no <recipe>/seed_<s>/results.json here (a finished --demo folder).")
    print("recipe      seed  encoder after  all    base   novel   (every row a prototype, all 15 classes)")
    for result in runs:
        run = result.parent
        cfg, seed = json.loads((run / "run_config.json").read_text()), int(run.name.split("_")[1])
        data = demo_data(seed)
        plan = plan_for(cfg["setting"], None, len(data.class_names), cfg["base_classes"], cfg["way"], cfg["sessions"])
        pools = read_index_list(run / "index_list.txt", len(data.train.labels))
        rows = np.concatenate([session_rows(s, plan, cfg["setting"], cfg["shots"], pools, data.train.labels)
                               for s in range(plan.sessions)])
        for session in (0, plan.sessions - 1):
            pipe = IncrementalClassifierPipeline.from_pretrained(run, session=session)
            train_x, train_y = embed_all(pipe.model.student, data.train.subset(rows), pipe.transform, 100)
            test_x, test_y = embed_all(pipe.model.student, data.test, pipe.transform, 100)
            base = test_y < plan.base
            scores = [_nearest_mean(train_x, train_y, x, y, plan.num_classes)
                      for x, y in ((test_x, test_y), (test_x[base], test_y[base]), (test_x[~base], test_y[~base]))]
            print(f"{run.parent.name:10s}  {seed:4d}  session {session:<5d}  " + "  ".join(f"{v:5.1f}" for v in scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs-base", type=int, default=8)
    parser.add_argument("--epochs-incremental", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--probe", action="store_true", help="the frozen demo tower on the pattern world")
    parser.add_argument("--rescore", type=Path, help="a finished --demo folder, every classifier row a prototype")
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARKER + json.dumps(worker(args.worker[0], args)))
        return
    if args.probe or args.rescore:
        probe() if args.probe else rescore(args.rescore)
        return
    rows = {r: run_child(__file__, MARKER, r) for r in ("coact", "finetune")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device_name(device)}; memory: {'CUDA allocator peak' if device == 'cuda' else 'RSS'}")
    print("session  steps  coact s  finetune s  time ratio  coact MiB  finetune MiB  memory ratio")
    coact, naive = rows["coact"], rows["finetune"]
    for s, (tc, tn) in enumerate(zip(coact["train_s"], naive["train_s"])):
        mc, mn = coact["peak_mib"][s], naive["peak_mib"][s]
        print(f"{s:7d}  {coact['steps'][s]:5d}  {tc:7.2f}  {tn:10.2f}  {tc / max(tn, 1e-9):10.2f}  {mc:9.1f}  "
              f"{mn:12.1f}  {mc / max(mn, 1e-9):12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
