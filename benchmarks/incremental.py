"""CoACT against naive per-session LoRA fine-tuning: time and peak memory per session, measured side by side.

    python benchmarks/incremental.py                       # the demo stream (tiny tower, 6 sessions)
    python benchmarks/incremental.py --epochs-base 2 --epochs-incremental 1

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs-base", type=int, default=8)
    parser.add_argument("--epochs-incremental", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARKER + json.dumps(worker(args.worker[0], args)))
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
