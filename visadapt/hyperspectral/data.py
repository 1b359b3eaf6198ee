"""Hyperspectral scenes on disk, whitened PCA, patches around labelled pixels and stratified splits (spec §2, §10).

A scene is a cube ``X ∈ R^{H×W×B}`` and a ground-truth map ``Y ∈ {0..K}^{H×W}`` (0 = unlabelled). Known datasets load
by name from a folder holding their usual files (:data:`DATASETS`: file names and ``.mat`` keys of the common
distributions); any other scene loads from ``.mat`` (MATLAB ≤ 7.2 through scipy; 7.3/HDF5 through h5py when
installed), ``.npy`` or ``.npz`` files with the keys given. Patches are cut on the fly from the padded PCA cube, so
no scene is ever materialised as patches (the release's 2.8–5.2 GB arrays).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from visadapt.utils import DatasetLayoutError, save_json_atomic

__all__ = ["DATASETS", "Scene", "DatasetLayoutError", "load_scene", "load_array", "fit_pca", "PCA",
           "PatchSet", "stratified_split", "Split", "standardize"]


@dataclass(frozen=True)
class DatasetFiles:
    data: str
    data_key: str
    gt: str
    gt_key: str
    classes: tuple[str, ...] = ()


_SALINAS = ("Brocoli_green_weeds_1", "Brocoli_green_weeds_2", "Fallow", "Fallow_rough_plow", "Fallow_smooth",
            "Stubble", "Celery", "Grapes_untrained", "Soil_vinyard_develop", "Corn_senesced_green_weeds",
            "Lettuce_romaine_4wk", "Lettuce_romaine_5wk", "Lettuce_romaine_6wk", "Lettuce_romaine_7wk",
            "Vinyard_untrained", "Vinyard_vertical_trellis")
_INDIAN_PINES = ("Alfalfa", "Corn-notill", "Corn-mintill", "Corn", "Grass-pasture", "Grass-trees",
                 "Grass-pasture-mowed", "Hay-windrowed", "Oats", "Soybean-notill", "Soybean-mintill", "Soybean-clean",
                 "Wheat", "Woods", "Buildings-Grass-Trees-Drives", "Stone-Steel-Towers")
_PAVIA_U = ("Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil", "Bitumen",
            "Self-Blocking Bricks", "Shadows")
_PAVIA_C = ("Water", "Trees", "Asphalt", "Self-Blocking Bricks", "Bitumen", "Tiles", "Shadows", "Meadows",
            "Bare Soil")
_LONGKOU = ("Corn", "Cotton", "Sesame", "Broad-leaf soybean", "Narrow-leaf soybean", "Rice", "Water",
            "Roads and houses", "Mixed weed")
_HONGHU = ("Red roof", "Road", "Bare soil", "Cotton", "Cotton firewood", "Rape", "Chinese cabbage", "Pakchoi",
           "Cabbage", "Tuber mustard", "Brassica parachinensis", "Brassica chinensis", "Small Brassica chinensis",
           "Lactuca sativa", "Celtuce", "Film covered lettuce", "Romaine lettuce", "Carrot", "White radish",
           "Garlic sprout", "Broad bean", "Tree")
_HANCHUAN = ("Strawberry", "Cowpea", "Soybean", "Sorghum", "Water spinach", "Watermelon", "Greens", "Trees", "Grass",
             "Red roof", "Gray roof", "Plastic", "Bare soil", "Road", "Bright object", "Water")

# File names and keys of the usual distributions (spec §10); class names in label order (label 1 first).
DATASETS: dict[str, DatasetFiles] = {
    "salinas": DatasetFiles("Salinas_corrected.mat", "salinas_corrected", "Salinas_gt.mat", "salinas_gt", _SALINAS),
    "indian_pines": DatasetFiles("Indian_pines_corrected.mat", "indian_pines_corrected", "Indian_pines_gt.mat",
                                 "indian_pines_gt", _INDIAN_PINES),
    "pavia_university": DatasetFiles("PaviaU.mat", "paviaU", "PaviaU_gt.mat", "paviaU_gt", _PAVIA_U),
    "pavia_centre": DatasetFiles("Pavia.mat", "pavia", "Pavia_gt.mat", "pavia_gt", _PAVIA_C),
    "longkou": DatasetFiles("WHU_Hi_LongKou.mat", "WHU_Hi_LongKou", "WHU_Hi_LongKou_gt.mat", "WHU_Hi_LongKou_gt",
                            _LONGKOU),
    "honghu": DatasetFiles("WHU_Hi_HongHu.mat", "WHU_Hi_HongHu", "WHU_Hi_HongHu_gt.mat", "WHU_Hi_HongHu_gt", _HONGHU),
    "hanchuan": DatasetFiles("WHU_Hi_HanChuan.mat", "WHU_Hi_HanChuan", "WHU_Hi_HanChuan_gt.mat",
                             "WHU_Hi_HanChuan_gt", _HANCHUAN),
}
_SEARCH = ("", "data", "Matlab_data_format")  # the release reads data/<file>; WHU-Hi ships Matlab_data_format/


@dataclass
class Scene:
    """A cube ``(H, W, B)`` float32 and its ground truth ``(H, W)`` int64 (0 = unlabelled, 1..K)."""

    name: str
    cube: np.ndarray
    gt: np.ndarray
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise DatasetLayoutError("This .mat file is MATLAB v7.3 (HDF5); reading it needs h5py: pip install h5py. "
                                 "Or re-save it in MATLAB with save(..., '-v7').") from err
    return h5py


def _only_key(path: Path, keys: Sequence[str], key: Optional[str], what: str) -> str:
    """``key``, or the file's one variable when no key is given; a clear error otherwise."""
    if key is not None:
        if key not in keys:
            raise DatasetLayoutError(f"{path} has no {what} {key!r}; it holds {sorted(keys)}. Pass one of them as the "
                                     "key (--data-key / --gt-key).")
        return key
    if len(keys) == 1:
        return keys[0]
    raise DatasetLayoutError(f"{path} holds several {what}s ({sorted(keys)}); name one with --data-key / --gt-key.")


def load_array(path: Union[str, Path], key: Optional[str] = None) -> np.ndarray:
    """One array from a ``.mat``, ``.npz`` or ``.npy`` file; ``key`` names it when the file holds several.

    MATLAB v7.3 files are HDF5; their datasets come back in column-major order and are transposed to (H, W, B).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".mat"):
        raise DatasetLayoutError(f"{path}: expected a .mat, .npy or .npz file.")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return npz[_only_key(path, npz.files, key, "array")]
        return _load_mat(path, key)
    except DatasetLayoutError:
        raise
    except (ValueError, OSError, EOFError, TypeError) as err:
        # numpy calls any unreadable .npy "pickled (object) data"; scipy a truncated .mat "could not read bytes".
        raise DatasetLayoutError(f"{path} is not a readable {suffix} array file: it is truncated, corrupt or of "
                                 f"another format ({err}). Re-export it (numpy.save / scipy.io.savemat).") from err


def _load_mat(path: Path, key: Optional[str]) -> np.ndarray:
    import scipy.io

    try:
        names = [name for name, *_ in scipy.io.whosmat(str(path))]
    except NotImplementedError:  # MATLAB v7.3 (HDF5)
        with _h5py().File(path, "r") as f:
            return np.asarray(f[_only_key(path, list(f.keys()), key, "variable")]).T
    key = _only_key(path, names, key, "variable")
    # Only the requested variable: scene files may hold several large cubes.
    return scipy.io.loadmat(str(path), variable_names=[key])[key]


def scene_from_arrays(cube: np.ndarray, gt: np.ndarray, name: str = "scene",
                      class_names: Optional[Sequence[str]] = None) -> Scene:
    """Check and convert: cube (H, W, B) float32, gt (H, W) int64 with labels 0..K, K ≥ 2."""
    cube, gt = np.asarray(cube), np.asarray(gt).squeeze()
    if cube.ndim != 3:
        raise ValueError(f"{name}: the cube must be (H, W, bands), got shape {cube.shape}.")
    if gt.ndim != 2:
        raise ValueError(f"{name}: the ground truth must be an (H, W) map, got shape {gt.shape}.")
    if cube.shape[:2] != gt.shape:
        raise ValueError(f"{name}: cube is {cube.shape[0]}×{cube.shape[1]} pixels (shape {cube.shape}) but the ground "
                         f"truth is {gt.shape[0]}×{gt.shape[1]}; they must cover the same pixels.")
    if not np.issubdtype(gt.dtype, np.number) or np.any(gt != np.round(gt)) or gt.min() < 0:
        raise ValueError(f"{name}: the ground truth must hold integers 0 (unlabelled), 1..K.")
    gt = gt.astype(np.int64)
    k = int(gt.max())
    if k < 2:
        raise ValueError(f"{name}: the ground truth has {k} class(es); classification needs at least 2.")
    names = list(class_names) if class_names else [f"class {i}" for i in range(1, k + 1)]
    if len(names) < k:
        raise ValueError(f"{name}: {len(names)} class names for labels up to {k}.")
    if not np.isfinite(cube).all():
        raise ValueError(f"{name}: the cube holds NaN or infinite values.")
    return Scene(name, np.ascontiguousarray(cube, dtype=np.float32), gt, names[:k])


def _find(root: Path, filename: str) -> Optional[Path]:
    for sub in _SEARCH:
        for candidate in (root / sub / filename, root / sub / filename.lower()):
            if candidate.is_file():
                return candidate
    return None


def load_scene(dataset: Optional[str] = None, root: Union[str, Path, None] = None, *,
               data: Union[str, Path, None] = None, data_key: Optional[str] = None,
               gt: Union[str, Path, None] = None, gt_key: Optional[str] = None,
               class_names: Optional[Sequence[str]] = None) -> Scene:
    """A known dataset by name from ``root`` (see :data:`DATASETS`), or any cube + ground truth by file and key."""
    if dataset is not None:
        key = dataset.lower().replace("-", "_")
        if key not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}. For other scenes "
                             "pass the cube and ground-truth files with their keys.")
        if root is None:
            raise ValueError(f"{dataset}: pass the folder (--root) that holds its files.")
        spec, root = DATASETS[key], Path(root)
        files = {which: _find(root, name) for which, name in (("data", spec.data), ("gt", spec.gt))}
        if None in files.values():
            raise DatasetLayoutError(
                f"{dataset}: expected {spec.data} (variable {spec.data_key!r}) and {spec.gt} (variable "
                f"{spec.gt_key!r}) in {root} or its data/ or Matlab_data_format/ folder; missing: "
                f"{', '.join(n for n, w in ((spec.data, 'data'), (spec.gt, 'gt')) if files[w] is None)}.")
        return scene_from_arrays(load_array(files["data"], spec.data_key), load_array(files["gt"], spec.gt_key),
                                 key, class_names or spec.classes)
    if data is None or gt is None:
        raise ValueError("Pass a dataset name and root, or the cube and ground-truth files (--data, --gt).")
    return scene_from_arrays(load_array(data, data_key), load_array(gt, gt_key), Path(data).stem, class_names)


# --------------------------------------------------------------------------------------------------------- PCA
@dataclass
class PCA:
    """Whitened PCA: ``z = (x − mean) @ components.T / sqrt(variance)`` (sklearn's ``PCA(whiten=True)``)."""

    mean: np.ndarray  # (B,)
    components: np.ndarray  # (n, B), rows in decreasing variance, sign: largest |entry| positive
    variance: np.ndarray  # (n,) explained variance (ddof = 1)

    @property
    def n_components(self) -> int:
        return len(self.variance)

    def transform(self, cube: np.ndarray) -> np.ndarray:
        """(H, W, B) or (N, B) → (…, n) float32."""
        if cube.shape[-1] != len(self.mean):
            raise ValueError(f"PCA was fitted on {len(self.mean)} bands; this cube has {cube.shape[-1]}.")
        flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64) - self.mean
        z = flat @ self.components.T / np.sqrt(self.variance)
        return z.reshape(*cube.shape[:-1], -1).astype(np.float32)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"pca.mean": torch.from_numpy(self.mean), "pca.components": torch.from_numpy(self.components),
                "pca.variance": torch.from_numpy(self.variance)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PCA":
        return cls(tensors["pca.mean"].numpy(), tensors["pca.components"].numpy(), tensors["pca.variance"].numpy())


def fit_pca(cube: np.ndarray, n_components: int) -> PCA:
    """Fit on every pixel of the scene (the release's transductive PCA); eigen-decomposition in float64."""
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    bands = flat.shape[1]
    if not 1 <= n_components <= bands:
        raise ValueError(f"PCA components must be in 1..{bands} (the bands), got {n_components}.")
    mean = flat.mean(axis=0)
    centred = flat - mean
    cov = centred.T @ centred / max(1, len(flat) - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:n_components]
    values, vectors = values[order], vectors[:, order].T
    signs = np.sign(vectors[np.arange(n_components), np.abs(vectors).argmax(axis=1)])
    vectors *= signs[:, None]
    if values[-1] <= 1e-12 * max(values[0], 1e-300):
        raise ValueError(f"The scene has fewer than {n_components} independent spectral directions; ask for fewer "
                         "PCA components.")
    return PCA(mean, vectors, values)


INPUT_NORMS = ("band", "patch", "none")


def standardize(x: torch.Tensor, mode: str = "band", eps: float = 1e-8) -> torch.Tensor:
    """Per-sample z-score of patches ``[B, C, H, W]``.

    - ``band`` (the release, §2.5): for each sample and PCA band, over the patch's pixels. Note what this does in the
      intended layout: every band loses its patch mean, so a pixel's absolute spectrum is gone and only the spatial
      contrast inside the patch remains; in a homogeneous region the patch becomes noise. (In the release the axis
      scramble makes it run over (column, band) per row instead, which keeps spectral contrast.)
    - ``patch``: one mean and std per sample over bands and pixels; keeps the spectral shape.
    - ``none``: the whitened PCA values as they are.
    """
    if mode == "none":
        return x
    dims = (2, 3) if mode == "band" else (1, 2, 3)
    if mode not in INPUT_NORMS:
        raise ValueError(f"input normalisation must be one of {INPUT_NORMS}, got {mode!r}.")
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + eps)


# ----------------------------------------------------------------------------------------------------- patches
class PatchSet(torch.utils.data.Dataset):
    """Patches ``[C, S, S]`` centred on given pixels of a PCA cube, cut on demand from its padded copy.

    ``padding``: "reflect" (default; mirrors the scene at its border) or "zero" (the release). Items are fetched a
    batch at a time (``__getitems__``): indices, or ``(index, seed)`` pairs from a batch sampler, give one
    float tensor ``[n, C, S, S]`` normalised by :func:`standardize` (``norm``) and the labels (−1 where none).
    """

    def __init__(self, pca_cube: np.ndarray, coords: np.ndarray, labels: Optional[np.ndarray], patch_size: int,
                 padding: str = "reflect", norm: str = "band") -> None:
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch size must be odd and positive, got {patch_size}.")
        if padding not in ("reflect", "zero"):
            raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}.")
        m = patch_size // 2
        h, w, _ = pca_cube.shape
        if padding == "reflect" and m >= min(h, w):
            raise ValueError(f"reflect padding of {m} pixels needs a scene larger than {m}×{m}; this one is {h}×{w}.")
        mode = "reflect" if padding == "reflect" else "constant"
        padded = np.pad(pca_cube, ((m, m), (m, m), (0, 0)), mode=mode)
        self.padded = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))  # [C, H+2m, W+2m]
        self.coords = torch.as_tensor(np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)) if labels is not None \
            else torch.full((len(self.coords),), -1, dtype=torch.int64)
        if norm not in INPUT_NORMS:
            raise ValueError(f"input normalisation must be one of {INPUT_NORMS}, got {norm!r}.")
        self.patch_size, self.norm = patch_size, norm
        self._offsets = torch.arange(patch_size)

    def __len__(self) -> int:
        return len(self.coords)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rc = self.coords[index]
        rows = (rc[:, 0, None] + self._offsets)[:, :, None]  # top-left in padded = centre in original
        cols = (rc[:, 1, None] + self._offsets)[:, None, :]
        x = self.padded[:, rows, cols].permute(1, 0, 2, 3)  # [n, C, S, S]
        return standardize(x, self.norm), self.labels[index]

    def __getitems__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor([i[0] if isinstance(i, (tuple, list)) else i for i in items], dtype=torch.int64)
        return self.batch(index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.as_tensor([i]))
        return x[0], y[0]


def collate_batch(batch):
    """``DataLoader`` collate for :class:`PatchSet`, whose ``__getitems__`` already returns a batch."""
    return batch


# ------------------------------------------------------------------------------------------------------ splits
@dataclass
class Split:
    """Train / validation / test pixels as (row, col) arrays; labels are 0-based (gt − 1)."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray
    settings: dict

    def labels(self, gt: np.ndarray, which: str) -> np.ndarray:
        coords = getattr(self, which)
        return gt[coords[:, 0], coords[:, 1]] - 1

    def to_json(self) -> dict:
        return {**self.settings, "train": self.train.tolist(), "val": self.val.tolist()}

    @classmethod
    def from_json(cls, obj: dict, gt: np.ndarray) -> "Split":
        """Rebuild a saved split; test = every labelled pixel not in train or val."""
        train = np.asarray(obj["train"], dtype=np.int64).reshape(-1, 2)
        val = np.asarray(obj.get("val", []), dtype=np.int64).reshape(-1, 2)
        if obj.get("shape") and tuple(obj["shape"]) != gt.shape:
            raise ValueError(f"The saved split is for a {obj['shape'][0]}×{obj['shape'][1]} scene; this ground truth "
                             f"is {gt.shape[0]}×{gt.shape[1]}.")
        taken = np.zeros(gt.shape, dtype=bool)
        taken[train[:, 0], train[:, 1]] = True
        taken[val[:, 0], val[:, 1]] = True
        test = np.argwhere((gt > 0) & ~taken)
        settings = {k: v for k, v in obj.items() if k not in ("train", "val")}
        return cls(train, test, val, settings)

    def save(self, path: Union[str, Path]) -> None:
        save_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path: Union[str, Path], gt: np.ndarray) -> "Split":
        return cls.from_json(json.loads(Path(path).read_text()), gt)


def _per_class_counts(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """sklearn-style stratified allocation: n_train = n − ⌈(1 − f)·n⌉ in all, spread over classes by floor and
    largest remainder (ties by class order)."""
    n = int(sizes.sum())
    total = n - int(np.ceil(round((1 - fraction) * n, 9)))
    exact = sizes * total / n
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    order = np.lexsort((np.arange(len(sizes)), -(exact - counts)))
    counts[order[:remainder]] += 1
    return counts


def stratified_split(gt: np.ndarray, train: Union[float, int], seed: int = 345,
                     val: Union[float, int] = 0, class_names: Optional[Sequence[str]] = None) -> Split:
    """Pick training pixels per class: ``train`` < 1 is a fraction of each class (the release: 0.1; README: 0.02),
    an integer ≥ 1 a count per class (a class without more pixels than that, one left to test, is an error that
    names it with ``class_names``). ``val`` takes a fraction or per-class count *of the training pixels* for
    validation. Same (gt, train, val, seed) → same split.
    """
    gt = np.asarray(gt)
    labels = gt[gt > 0]
    classes = np.arange(1, int(gt.max()) + 1)
    sizes = np.array([(labels == c).sum() for c in classes])
    if (sizes == 0).any():
        missing = [int(c) for c in classes[sizes == 0]]
        raise ValueError(f"Classes {missing} have no labelled pixels; labels must be 1..K without gaps.")
    if isinstance(train, float) and not 0 < train < 1:
        raise ValueError(f"A training fraction must be in (0, 1), got {train}.")
    if isinstance(train, int) and train < 1:
        raise ValueError(f"A per-class training count must be >= 1, got {train}.")
    if isinstance(train, int) and (sizes <= train).any():
        short = [(int(n), int(c)) for n, c in sorted(zip(sizes, classes)) if n <= train]
        named = ", ".join(f"{class_names[c - 1] if class_names and c <= len(class_names) else f'class {c}'} ({n})"
                          for n, c in short[:5])
        raise ValueError(f"--train {train}: {len(short)} class(es) hold too few labelled pixels for {train} training "
                         f"pixels and at least one test pixel: {named}. Lower --train below {int(sizes.min())}, or "
                         "pass a fraction (e.g. --train 0.1).")
    counts = _per_class_counts(sizes, train) if isinstance(train, float) else np.full(len(sizes), train)
    if (counts < 1).any():
        few = [int(c) for c in classes[counts < 1]]
        raise ValueError(f"Classes {few} get no training pixel at this fraction; use a larger fraction or a count.")
    rng = np.random.default_rng(seed)
    train_rc, val_rc = [], []
    for c, k in zip(classes, counts):
        pixels = np.argwhere(gt == c)
        chosen = pixels[rng.permutation(len(pixels))[:k]]
        if val:
            n_val = int(round(val * k)) if isinstance(val, float) else min(int(val), k - 1)
            n_val = min(max(n_val, 0), k - 1)
            val_rc.append(chosen[:n_val])
            chosen = chosen[n_val:]
        train_rc.append(chosen)
    train_arr = np.concatenate(train_rc)
    val_arr = np.concatenate(val_rc) if val_rc else np.zeros((0, 2), dtype=np.int64)
    settings = {"train_setting": train, "val_setting": val, "seed": seed, "shape": list(gt.shape)}
    return Split.from_json({**settings, "train": train_arr.tolist(), "val": val_arr.tolist()}, gt)
