"""CoACT's session loop, each session a page on :class:`visadapt.training.Trainer`.

A run folder holds ``run_config.json``, ``index_list.txt`` (the few-shot pools, official format), one folder per
session (``session_<s>/``: the Trainer's ``run_config.json``, ``results.json``, ``training_curve.png``,
``report.md`` and ``model.safetensors``, the weights that session can change: adapter, classifier, the
controlled-fine-tuning blocks and their teacher copies; with ``--shared-inc-optimizer`` a later session also keeps
``momentum.safetensors``, the SGD momentum the next session starts from), then ``results.json`` (per-session
base / novel / all accuracy, per-group accuracy, average accuracy, performance drop, base forgetting, harmonic means),
``sessions.png``, ``groups.png``, ``report.md`` and the pipeline (``pipeline.json`` + ``model.safetensors``).

A session that finished is never rerun; ``resume=True`` continues the interrupted session from its checkpoint,
bit-exactly (batches, views and dropout are functions of the seed and the step), and the later ones after it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visadapt.training import RUN_CONFIG, ShotBatches, StepCallback, Trainer
from visadapt.utils import atomic_path, load_safetensors, save_json_atomic, write_text_atomic
from visadapt.utils.modules import trainable_parameters

from .config import IncrementalConfig
from .data import (
    EvalImages,
    ImageSource,
    IncrementalData,
    TwoViews,
    collate_views,
    eval_transform,
    load_dataset,
    train_transform,
)
from .losses import consistency, ema_update, normalized, supcon
from .metrics import plot_group_heatmap, plot_sessions, session_accuracy, summarize
from .model import Backbone, CoactModel, Encoder, adapter_config, load_backbone
from .sessions import (
    DRAW,
    SessionPlan,
    cec_session_to_pools,
    draw_pools,
    plan_for,
    read_index_list,
    session_rows,
    standard_index_list,
    write_index_list,
)

WEIGHTS = "model.safetensors"
MOMENTUM = "momentum.safetensors"  # --shared-inc-optimizer: the SGD momentum a later session ends with
RESUME_FREE = frozenset({"checkpoint_every", "workers", "eval_batch_size", "precision"})


@dataclass
class Stream:
    """What the sessions of one run share: data, schedule, pools and the models (the student with its teacher,
    the pristine pretrained encoder and, from session 1, the frozen base-session model)."""

    cfg: IncrementalConfig
    data: IncrementalData
    plan: SessionPlan
    pools: dict
    backbone: Backbone
    model: CoactModel
    pretrained: Encoder
    out: Path
    base: Optional[CoactModel] = None
    sessions: list = field(default_factory=list)
    inc_optimizer: Optional[torch.optim.SGD] = None  # --shared-inc-optimizer: the later sessions' one SGD

    @property
    def image_size(self) -> int:
        return self.cfg.image_size or self.backbone.image_size

    def eval_tf(self):
        return eval_transform(self.image_size, self.backbone.mean, self.backbone.std)


@torch.no_grad()
def embed_all(encoder: nn.Module, source: ImageSource, transform, batch_size: int, desc: str = "embed"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) embeddings (eval mode, eval transform) and (N,) labels of every image of ``source``."""
    loader = DataLoader(EvalImages(source, transform), batch_size=batch_size, shuffle=False)
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        feats.append(encoder(x.to(device)).float().cpu())
        labels.append(y)
    encoder.train(was)
    return torch.cat(feats), torch.cat(labels)


def prototypes(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(len(classes), D): the mean embedding of each class."""
    rows = []
    for c in classes:
        chosen = features[labels == c]
        if not len(chosen):
            raise ValueError(f"Class {c} has no training image in this session.")
        rows.append(chosen.mean(0))
    return torch.stack(rows)


class SessionTrainer(Trainer):
    """One session of the stream into ``out_dir`` (``<run>/session_<s>``)."""

    resume_free = RESUME_FREE

    def __init__(self, stream: Stream, session: int, out_dir: Path, resume: bool = False,
                 callbacks: Sequence[StepCallback] = ()) -> None:
        self.stream, self.session = stream, session
        super().__init__(stream.cfg, out_dir, resume=resume, callbacks=callbacks)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        st, c, s = self.stream, self.cfg, self.session
        model = st.model
        if s > 0:
            model.load_tracked(load_safetensors(st.out / f"session_{s - 1}" / WEIGHTS))
            if st.base is None:
                st.base = self._frozen_base()
        model.requires_grad_(False)
        self.stage2 = model.stage2_names(c.ft_start_layer)
        rows = session_rows(s, st.plan, c.setting, c.shots, st.pools, st.data.train.labels)
        source = st.data.train.subset(rows)
        self._set_prototypes(source)
        self.train_set = TwoViews(source, train_transform(st.image_size, st.backbone.mean, st.backbone.std,
                                                          c.crop_scale_min))
        self.collate_fn = collate_views
        epochs = c.epochs_base if s == 0 else c.epochs_incremental
        self.steps_per_epoch = ShotBatches.batches_per_epoch(len(source), c.batch_size)
        self.epochs = epochs
        self.total_steps = epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = self._optimizer(model)
        self.model = model

    def _frozen_base(self) -> CoactModel:
        base = copy.deepcopy(self.stream.model)
        base.load_tracked(load_safetensors(self.stream.out / "session_0" / WEIGHTS))
        return base.requires_grad_(False).eval()

    def _set_prototypes(self, source: ImageSource) -> None:
        st, model = self.stream, self.stream.model
        classes = list(st.plan.new_classes(self.session))
        feats, labels = embed_all(model.student, source, st.eval_tf(), self.cfg.eval_batch_size,
                                  desc=f"prototypes s{self.session}")
        with torch.no_grad():
            model.classifier.weight[classes] = prototypes(feats, labels, classes).to(model.classifier.weight)

    def _optimizer(self, model: CoactModel):
        c, named = self.cfg, dict(model.named_parameters())
        sgd = dict(momentum=c.momentum, nesterov=c.momentum > 0, weight_decay=c.weight_decay)
        if self.session == 0:
            first = [named[n] for n in [*model.adapter_names, "classifier.weight"]]
            for p in first:
                p.requires_grad_(True)
            groups = [{"params": first, "lr": c.lr}]
            if self.stage2:
                groups.append({"params": [named[n] for n in self.stage2], "lr": c.lr * c.encoder_lr_factor})
            optimizer = torch.optim.SGD(groups, **sgd)
            spe, epochs = self.steps_per_epoch, max(self.epochs, 1)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * (step // spe) / epochs)))
            return optimizer, schedule
        names = ([*model.adapter_names] if "pet" in c.incremental_layers else []) + (
            ["classifier.weight"] if "classifier" in c.incremental_layers else [])
        if self.total_steps and not names:
            raise ValueError("--epochs-incremental > 0 but --incremental-layers names nothing to tune "
                             "(classifier, pet).")
        params = [named[n] for n in names] or [named["classifier.weight"]]
        for p in params:
            p.requires_grad_(bool(names))
        optimizer = self.stream.inc_optimizer if c.shared_inc_optimizer else None
        if optimizer is None:
            optimizer = torch.optim.SGD(params, lr=c.lr * c.inc_lr_factor, **sgd)
            if c.shared_inc_optimizer:
                self._load_momentum(optimizer)
                self.stream.inc_optimizer = optimizer
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def _load_momentum(self, optimizer: torch.optim.SGD) -> None:
        """A resumed run's shared SGD starts from the momentum the previous session ended with (saved by it)."""
        path = self.stream.out / f"session_{self.session - 1}" / MOMENTUM
        if self.session < 2 or not path.exists():
            return
        params = optimizer.param_groups[0]["params"]
        for index, buffer in load_safetensors(path).items():
            optimizer.state[params[int(index)]]["momentum_buffer"] = buffer.to(params[int(index)])

    def _save_momentum(self) -> None:
        optimizer = self.stream.inc_optimizer
        params = optimizer.param_groups[0]["params"]
        buffers = {str(i): optimizer.state[p]["momentum_buffer"].detach().contiguous().cpu()
                   for i, p in enumerate(params) if optimizer.state[p].get("momentum_buffer") is not None}
        with atomic_path(self.out / MOMENTUM) as tmp:
            save_file(buffers, tmp)

    # ---------------------------------------------------------------------------------------------- training
    def before_training(self, state: dict) -> None:
        self.step = state["step"]
        device = self.accelerator.device  # the trainer moved the student; the frozen models follow it
        self.stream.pretrained.to(device)
        if self.stream.base is not None:
            self.stream.base.to(device)

    def _stage(self, epoch: int) -> None:
        """Controlled fine-tuning: the stage-2 weights train from ``ft_start_epoch`` on."""
        on = epoch >= self.cfg.ft_start_epoch
        named = dict(self.stream.model.named_parameters())
        for name in self.stage2:
            named[name].requires_grad_(on)

    def backward(self, batch) -> torch.Tensor:
        if self.session == 0:
            self._stage(self.step // self.steps_per_epoch)
        loss = super().backward(batch)
        self.step += 1
        return loss

    def _ema(self) -> None:
        model, pairs = self.stream.model, self.stream.model.shared
        named = dict(model.named_parameters())
        ema_update([named[pairs[n]] for n in self.stage2], [named[n] for n in self.stage2], self.cfg.ema_momentum)

    def compute_loss(self, batch) -> torch.Tensor:
        x1, x2, y = batch
        c, model = self.cfg, self.stream.model
        features, logits = self.model(x1, return_features=True)
        loss = (c.ce_weight if self.session == 0 else c.inc_ce_weight) * F.cross_entropy(logits.float(), y)
        if self.session == 0:
            if c.supcon_weight:
                self._ema()  # before the teacher's forward
                with torch.no_grad():
                    teacher = model.teacher(x2)
                views = torch.stack([normalized(features), normalized(teacher)], 1)
                loss = loss + c.supcon_weight * supcon(views, y, c.temperature)
            return loss
        return loss + self._incremental_terms(x1, x2, y, features, logits)

    def _incremental_terms(self, x1, x2, y, features, logits) -> torch.Tensor:
        c, st = self.cfg, self.stream
        base, model = st.base, st.model
        extra = torch.zeros((), device=logits.device)
        if c.supcon_weight or c.consistency_weight:
            self._ema()  # the official code keeps updating the current teacher
        if c.supcon_weight:
            with torch.no_grad():
                if c.incremental_contrast == "code":
                    others = [base.teacher(x2), st.pretrained(x2)]
                else:
                    others = [model.teacher(x2), base.student(x2)]
            if c.incremental_contrast == "code":
                views = torch.stack([normalized(features), *map(normalized, others)], 1)
                extra = extra + c.supcon_weight * supcon(views, y, c.temperature)
            else:
                for other in others:
                    views = torch.stack([normalized(features), normalized(other)], 1)
                    extra = extra + c.supcon_weight * supcon(views, y, c.temperature)
        if c.consistency_weight:
            with torch.no_grad():
                base_logits = base(x1)
            restrict = st.plan.base if c.consistency_logits == "base" else None
            extra = extra + c.consistency_weight * consistency(logits.float(), base_logits.float(), restrict)
        return extra

    def step_facts(self, step: int) -> dict:
        return {"epoch": (step - 1) // max(self.steps_per_epoch, 1)}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.stream.model.tracked_state(self.cfg.ft_start_layer)

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stream.model.load_tracked(tensors)

    # -------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, state: dict) -> dict:
        st, s = self.stream, self.session
        seen = st.plan.seen(s)
        rows = np.flatnonzero(st.data.test.labels < seen)
        model = st.model
        feats, labels = embed_all(model.student, st.data.test.subset(rows), st.eval_tf(), self.cfg.eval_batch_size,
                                  desc=f"test s{s}")
        with torch.no_grad():
            logits = model.logits(feats.to(model.classifier.weight))
        if self.cfg.mask_unseen:
            logits[:, seen:] = -torch.inf
        result = session_accuracy(logits.argmax(1).cpu().numpy(), labels.numpy(), st.plan, s)
        result.update({"new_classes": list(st.plan.new_classes(s)), "train_images": len(self.train_set),
                       "steps": state["step"], "trainable_params": trainable_parameters(model),
                       "train_time_s": state.get("train_time_s", 0.0)})
        return result

    def write_outputs(self, results: dict, state: dict) -> None:
        with atomic_path(self.out / WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.checkpoint_tensors().items()}, tmp)
        if self.session > 0 and self.stream.inc_optimizer is not None:
            self._save_momentum()  # the next session continues from it, also after a resume

    def report(self, results: dict) -> str:
        return (f"# Session {self.session}\n\nall {results['all']:.2f} %, base {results['base']:.2f} %"
                + (f", novel {results['novel']:.2f} %" if results["novel"] is not None else "")
                + "\n\n![training curve](training_curve.png)\n")

    def curve_title(self) -> str:
        return f"{self.cfg.recipe} session {self.session}"  # the demo trains three recipes side by side


# -------------------------------------------------------------------------------------------- the run loop
def _check_run(out: Path, cfg: IncrementalConfig, resume: bool) -> None:
    saved = out / RUN_CONFIG
    if (out / "results.json").exists():
        raise FileExistsError(f"{out} holds a finished run (results.json); choose a new --out.")
    if saved.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run. Pass --resume to continue it, or choose a new --out.")
    if resume and not saved.exists():
        raise FileNotFoundError(f"--resume: {out} holds no run to resume.")
    if resume:
        old, new = json.loads(saved.read_text()), cfg.to_json()
        changed = sorted(k for k in new if k not in RESUME_FREE and old.get(k) != new[k])
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in changed)
            raise ValueError(f"--resume: {out} was started with other settings ({diff}). Resume with the same "
                             "settings, or start a new run in another --out.")
    if not resume and out.is_dir() and any(p.name not in ("data",) for p in out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new or empty --out.")


def _pools(cfg: IncrementalConfig, data: IncrementalData, out: Path) -> dict:
    saved = out / "index_list.txt"
    if saved.exists():
        return read_index_list(saved, len(data.train.labels))
    if cfg.index_list and cfg.cec_sessions:
        raise ValueError("Pass --index-list or --cec-sessions, not both.")
    standard = standard_index_list(cfg.dataset)
    if cfg.index_list and cfg.index_list != DRAW:
        pools = read_index_list(cfg.index_list, len(data.train.labels))
    elif cfg.cec_sessions:
        pools = _cec_pools(Path(cfg.cec_sessions), data)
    elif standard and cfg.index_list != DRAW:  # the published numbers' samples
        pools = read_index_list(standard, len(data.train.labels))
    else:
        pools = draw_pools(data.train.labels, cfg.split_seed)
    write_index_list(pools, saved)
    return pools


def _cec_pools(folder: Path, data: IncrementalData) -> dict:
    files = sorted(folder.glob("session_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"--cec-sessions {folder}: no session_<s>.txt files there (CEC's data/index_list/"
                                "<dataset>/ folder holds them).")
    pools: dict = {}
    for path in files:
        for label, rows in cec_session_to_pools(path.read_text().splitlines(), data.train.names,
                                                data.train.labels).items():
            pools.setdefault(label, []).extend(rows)
    return pools


def validate(cfg: IncrementalConfig, has_data: bool) -> None:
    """Reject settings that cannot run, before anything is written (the message names the fix)."""
    if not has_data and not cfg.dataset:
        raise ValueError("Pass --dataset and --root (or --demo).")
    unknown = set(cfg.incremental_layers) - {"classifier", "pet"}
    if unknown:
        raise ValueError(f"--incremental-layers {sorted(unknown)}: choose among classifier, pet.")
    for name in ("index_list", "peft_config"):
        value = getattr(cfg, name)
        if value and value != DRAW and not Path(value).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {value}: no such file.")


def build_stream(cfg: IncrementalConfig, out: Path, data: Optional[IncrementalData] = None,
                 backbone: Optional[Backbone] = None) -> Stream:
    """Data, schedule, pools and models of a run (``data``/``backbone`` given: used instead of ``--dataset`` and
    ``--backbone``)."""
    run = cfg.with_recipe()
    data = data or load_dataset(cfg.dataset, cfg.root)
    plan = plan_for(cfg.setting, cfg.dataset if data.name != "demo" else None, len(data.class_names),
                    cfg.base_classes, cfg.way, cfg.sessions)
    backbone = backbone or load_backbone(run)
    if cfg.image_size and backbone.kind in ("timm", "open_clip") and cfg.image_size != backbone.image_size:
        raise ValueError(f"--image-size {cfg.image_size}: this backbone takes {backbone.image_size} pixels; drop "
                         "--image-size.")
    set_seed(cfg.seed)  # the adapter's and the future rows' random init
    model = CoactModel(backbone, plan.num_classes, adapter_config(run, backbone), run.classifier, run.cosine_scale)
    pretrained = copy.deepcopy(model.teacher).eval()
    return Stream(run, data, plan, _pools(cfg, data, out), backbone, model, pretrained, out)


def train(cfg: IncrementalConfig, out_dir: str | Path, resume: bool = False, data: Optional[IncrementalData] = None,
          backbone: Optional[Backbone] = None, stop_after: Optional[int] = None,
          callbacks: Sequence[StepCallback] = ()) -> dict:
    """Run (or resume) every session into ``out_dir``; returns what ``results.json`` holds. ``stop_after=s`` stops
    once session ``s`` is done (the run stays resumable)."""
    out, started = Path(out_dir), time.perf_counter()
    validate(cfg, data is not None)
    _check_run(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    stream = build_stream(cfg, out, data, backbone)  # refuses a bad schedule or index list before out holds a run
    save_json_atomic(cfg.to_json(), out / RUN_CONFIG)
    in_sessions = 0.0  # each session counts its own wall time (resumed parts included); finish adds the rest
    for s in range(stream.plan.sessions):
        folder = out / f"session_{s}"
        if (folder / "results.json").exists():
            stream.sessions.append(json.loads((folder / "results.json").read_text()))
            continue
        trainer = SessionTrainer(stream, s, folder, resume=(folder / "checkpoint").exists(), callbacks=callbacks)
        session_started = time.perf_counter()
        stream.sessions.append(trainer.run())
        in_sessions += time.perf_counter() - session_started
        if stop_after is not None and s >= stop_after and s < stream.plan.sessions - 1:
            return {"sessions": stream.sessions, "finished": False}
    return finish(stream, time.perf_counter() - started - in_sessions)


def finish(stream: Stream, wall_s: float) -> dict:
    """``results.json``, the figures, ``report.md`` and the pipeline of a finished run; ``wall_s`` is the time spent
    outside the sessions, which count their own (``wall_time_s`` = ``wall_s`` + the sessions' sum)."""
    from .pipeline import IncrementalClassifierPipeline

    cfg, out = stream.cfg, stream.out
    sessions = [{k: v for k, v in s.items() if k not in ("device", "num_processes", "precision",
                                                         "visadapt_version")} for s in stream.sessions]
    results = {"setting": cfg.setting, "dataset": stream.data.name, "recipe": cfg.recipe, "backbone": cfg.backbone,
               "shots": cfg.shots, "seed": cfg.seed, "plan": stream.plan.to_json(), "sessions": sessions,
               **summarize(sessions), "wall_time_s": wall_s + sum(s.get("wall_time_s", 0.0) for s in sessions),
               "class_names": stream.data.class_names}
    save_json_atomic(results, out / "results.json")
    plot_sessions({cfg.recipe: sessions}, out / "sessions.png", title=f"{stream.data.name} {cfg.setting}")
    plot_group_heatmap(sessions, out / "groups.png", title=f"{cfg.recipe}: accuracy per session group")
    write_text_atomic(run_report([results]), out / "report.md")
    last = stream.plan.sessions - 1
    # a resumed run may have skipped every session: the pipeline takes the last one's weights from its folder
    stream.model.load_tracked(load_safetensors(out / f"session_{last}" / WEIGHTS))
    pipe = IncrementalClassifierPipeline.from_stream(stream, last)
    pipe.save_pretrained(out, session_weights={s: f"session_{s}/{WEIGHTS}" for s in range(last + 1)})
    return results


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def run_report(runs: Sequence[dict], names: Optional[Sequence[str]] = None) -> str:
    """Markdown: one row per run (summary metrics; the official per-batch 'all' in its own column) and one table of
    per-session accuracy per run."""
    names = list(names or [r["recipe"] for r in runs])
    lines = ["# Class-incremental runs", "", "| run | dataset | setting | avg acc | last acc | PD | base forgetting |"
             " final HM | avg / last acc per batch (official) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in zip(names, runs):
        lines.append(f"| {name} | {r['dataset']} | {r['setting']} | {_fmt(r['average_accuracy'])} | "
                     f"{_fmt(r['last_accuracy'])} | {_fmt(r['performance_drop'])} | {_fmt(r['base_forgetting'])} | "
                     f"{_fmt(r['harmonic_mean'][-1])} | {_fmt(r.get('average_accuracy_per_batch'))} / "
                     f"{_fmt(r.get('last_accuracy_per_batch'))} |")
    for name, r in zip(names, runs):
        lines += ["", f"## {name}: per session (all / base / novel, %)", "",
                  "| " + " | ".join(str(s["session"]) for s in r["sessions"]) + " |",
                  "|" + "---|" * len(r["sessions"]),
                  "| " + " | ".join(f"{_fmt(s['all'])} / {_fmt(s['base'])} / {_fmt(s['novel'])}"
                                    for s in r["sessions"]) + " |"]
    return "\n".join(lines) + "\n\n![sessions](sessions.png) ![groups](groups.png)\n"
