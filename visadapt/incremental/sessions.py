"""The session schedule of a class-incremental stream and its few-shot index lists.

Session 0 holds classes ``0 .. B-1``; session s >= 1 adds classes ``B + (s-1)·W .. B + s·W - 1``; the test set of
session s is every test image of the classes seen so far (labels are contiguous, so no masking of later classes is
needed). Index lists use the official format (``dataloaders/index_list/<dataset>_index_list.txt``): one
``<class_id> <sample_index>`` pair per line, ``sample_index`` a row of the training split in the loader's order; a
class's K shots are its first K lines. The official lists of CIFAR-100, CUB-200 and miniImageNet ship in
``index_lists/`` (where they come from: its README) and are the default pools of those datasets.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from visadapt.utils import write_text_atomic

from .config import FSCIL_TABLE, FSCIT_TABLE

POOL_SIZE = 32  # the official pools hold up to 32 samples a class
DRAW = "draw"  # --index-list draw: pools drawn with --split-seed instead of the standard list
STANDARD_LISTS = Path(__file__).parent / "index_lists"


def standard_index_list(dataset: str | None) -> Path | None:
    """The shipped official index list of ``dataset`` (its first 5 per class are CEC's samples); None if none."""
    path = STANDARD_LISTS / f"{dataset}_index_list.txt"
    return path if dataset and path.is_file() else None


@dataclass(frozen=True)
class SessionPlan:
    """How ``num_classes`` classes arrive: ``base`` in session 0, then ``way`` per session, ``sessions`` in all."""

    num_classes: int
    base: int
    way: int
    sessions: int

    def __post_init__(self) -> None:
        if self.base < 1 or self.way < 1 or self.sessions < 1:
            raise ValueError(f"base classes, way and sessions must be >= 1, got {self.base}, {self.way}, "
                             f"{self.sessions}.")
        if self.seen(self.sessions - 1) > self.num_classes:
            raise ValueError(f"{self.sessions} sessions of {self.way} new classes after {self.base} base classes "
                             f"need {self.seen(self.sessions - 1)} classes; the dataset has {self.num_classes}. "
                             "Lower --sessions or --way.")

    def seen(self, session: int) -> int:
        """Classes seen once session ``session`` is done."""
        return self.base + session * self.way

    def new_classes(self, session: int) -> range:
        """The classes session ``session`` introduces."""
        return range(0, self.base) if session == 0 else range(self.seen(session - 1), self.seen(session))

    def group_of(self, label: int) -> int:
        """The session that introduced class ``label``."""
        return 0 if label < self.base else 1 + (label - self.base) // self.way

    def to_json(self) -> dict:
        return {"num_classes": self.num_classes, "base": self.base, "way": self.way, "sessions": self.sessions}


def plan_for(setting: str, dataset: str | None, num_classes: int, base: int | None = None, way: int | None = None,
             sessions: int | None = None) -> SessionPlan:
    """The spec table's schedule of ``dataset`` under ``setting`` (``fscil`` / ``fscit``), with overrides."""
    table = FSCIL_TABLE if setting == "fscil" else FSCIT_TABLE
    if dataset in table:
        total, b, w, s = table[dataset]
        if total != num_classes and None not in (base, way):
            b, w, s = base, way, 0  # another release of the dataset (e.g. CoOp's 100-class Caltech101)
        elif total != num_classes:
            raise ValueError(f"{dataset} has {total} classes in the {setting} protocol; the files hold "
                             f"{num_classes}. Check --root, or pass --base-classes, --way and --sessions.")
    elif None in (base, way):
        known = ", ".join(sorted(table))
        raise ValueError(f"{setting} has no schedule for {dataset!r} (known: {known}); pass --base-classes and "
                         "--way (and --sessions).")
    else:
        b, w, s = base, way, 0
    b, w = base or b, way or w
    s = sessions or s or (num_classes - b) // w + 1
    return SessionPlan(num_classes, b, w, s)


def read_index_list(path: str | Path, num_rows: int | None = None) -> "OrderedDict[int, list[int]]":
    """``{class_id: [sample_index, ...]}`` in file order from an official index list; with ``num_rows`` (the size
    of the training split) a negative or out-of-range class id or sample index is refused with its line."""
    pools: OrderedDict[int, list[int]] = OrderedDict()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"{path}:{number}: expected `<class_id> <sample_index>` (two integers), got {line!r}.")
        label, row = int(parts[0]), int(parts[1])
        if label < 0:
            raise ValueError(f"{path}:{number}: class id {label} is negative; class ids start at 0.")
        if num_rows is not None and not 0 <= row < num_rows:
            raise ValueError(f"{path}:{number}: sample index {row} is outside 0..{num_rows - 1}, the rows of this "
                             f"{num_rows}-image training split; fix the line, or pass --index-list draw to draw "
                             "pools from these files.")
        pools.setdefault(label, []).append(row)
    return pools


def write_index_list(pools: dict[int, Sequence[int]], path: str | Path) -> None:
    """Write pools in the official format, class by class, atomically."""
    write_text_atomic("".join(f"{c} {i}\n" for c, indices in pools.items() for i in indices), path)


def draw_pools(train_labels: Sequence[int], seed: int, pool_size: int = POOL_SIZE) -> "OrderedDict[int, list[int]]":
    """A pool of up to ``pool_size`` training rows per class, drawn with ``random.Random(seed)`` (the official pools
    were drawn once, unseeded; CEC's 5-shot samples come first in theirs, which ship as the standard lists)."""
    rows: dict[int, list[int]] = {}
    for row, label in enumerate(train_labels):
        rows.setdefault(int(label), []).append(row)
    rng = random.Random(seed)
    return OrderedDict((c, rng.sample(rows[c], min(pool_size, len(rows[c])))) for c in sorted(rows))


def session_rows(session: int, plan: SessionPlan, setting: str, shots: int, pools: dict[int, Sequence[int]],
                 train_labels: Sequence[int]) -> list[int]:
    """Training rows of ``session``: under FSCIL all rows of the base classes in session 0, else the first
    ``shots`` of each new class's pool."""
    classes = plan.new_classes(session)
    if session == 0 and setting == "fscil":
        return [row for row, label in enumerate(train_labels) if int(label) < plan.base]
    rows = []
    for c in classes:
        pool = list(pools.get(c, []))
        if len(pool) < shots:
            raise ValueError(f"Class {c} has {len(pool)} samples in the index list; --shots {shots} needs that "
                             "many. Lower --shots or extend the list.")
        rows.extend(pool[:shots])
    _check_labels(rows, classes, shots, train_labels)
    return rows


def _check_labels(rows: Sequence[int], classes: range, shots: int, train_labels: Sequence[int]) -> None:
    """Every listed row exists and has its class's label: a list made for another release or order fails here
    instead of training on mislabelled images."""
    for i, row in enumerate(rows):
        c = classes[i // shots]
        if not 0 <= row < len(train_labels) or int(train_labels[row]) != c:
            found = "out of range" if not 0 <= row < len(train_labels) else f"labelled {int(train_labels[row])}"
            raise ValueError(f"Index list: sample {row} of class {c} is {found} in this training split; the list "
                             "does not match these files (pass --index-list draw to draw pools from them).")


def cec_session_to_pools(lines: Sequence[str], train_names: Sequence[str], train_labels: Sequence[int]
                         ) -> "OrderedDict[int, list[int]]":
    """Pools from a CEC ``session_<s>.txt``: integer lines are training rows (CIFAR-100); path lines are matched to
    the training images by their last two path parts (``<class folder>/<file>``, CUB and miniImageNet)."""
    by_name = {"/".join(Path(n).parts[-2:]): row for row, n in enumerate(train_names)}
    by_file = {Path(n).name: row for row, n in enumerate(train_names)}
    pools: OrderedDict[int, list[int]] = OrderedDict()
    for line in (raw.strip() for raw in lines):
        if not line:
            continue
        if line.isdigit():
            row = int(line)
        else:
            key = "/".join(Path(line).parts[-2:])
            row = by_name.get(key, by_file.get(Path(line).name, -1))
            if row < 0:
                raise ValueError(f"CEC session entry {line!r} names no training image of this dataset.")
        pools.setdefault(int(train_labels[row]), []).append(row)
    return pools
