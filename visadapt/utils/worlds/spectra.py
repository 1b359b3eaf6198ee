"""The spectra world: synthetic hyperspectral scenes, the embedded default of ``visadapt hsi train --demo``.

A scene (:func:`synthetic_scene`): irregular regions (a warped Voronoi partition) of K classes, each with its own
smooth reflectance spectrum over ~100 bands (400–1000 nm; a few absorption dips and a red edge, some classes close
to each other); pixels near region borders mix the two nearest classes' spectra, a smooth illumination field scales
them, and sensor noise is added. Pixels close to borders and a few whole regions stay unlabelled (0), as in real
ground truth. :func:`write_scene_mat` writes a scene as ``.mat`` files, as the real datasets ship, so the demo
trains through the same loader as real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

CLASSES = ("water", "asphalt", "grass", "trees", "crop A", "crop B", "bare soil", "roof")


@dataclass(frozen=True)
class SpectralScene:
    """A cube ``(H, W, B)`` float32 of reflectances and its ground truth ``(H, W)`` int64 (0 = unlabelled, 1..K)."""

    cube: np.ndarray
    gt: np.ndarray
    class_names: tuple[str, ...]


def _smooth_field(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A smooth random field in about [−1, 1]: a few random sinusoids."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros((h, w))
    for _ in range(6):
        fy, fx = rng.normal(0, 1 / scale, 2)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    return field / 6 ** 0.5


def _signatures(rng: np.random.Generator, classes: int, bands: int) -> np.ndarray:
    """Smooth reflectance spectra in [0, 1]; classes come in pairs that differ only slightly."""
    wl = np.linspace(400, 1000, bands)
    sig = np.zeros((classes, bands))
    for c in range(classes):
        if c % 2 and c > 0:  # a near twin of the previous class: shifted red edge and one extra dip
            s = sig[c - 1].copy()
            s *= 1 - 0.12 * np.exp(-((wl - rng.uniform(550, 950)) / 25) ** 2)
            s += 0.04 / (1 + np.exp(-(wl - rng.uniform(690, 740)) / 12))
        else:
            s = rng.uniform(0.05, 0.3) + rng.uniform(-0.1, 0.2) * (wl - 400) / 600
            s += rng.uniform(0.0, 0.4) / (1 + np.exp(-(wl - rng.uniform(680, 760)) / 15))  # red edge
            for _ in range(3):
                s -= rng.uniform(0.02, 0.12) * np.exp(-((wl - rng.uniform(420, 980)) / rng.uniform(10, 60)) ** 2)
        sig[c] = s
    return np.clip(sig, 0.01, 1.0)


def synthetic_scene(height: int = 80, width: int = 80, bands: int = 100, classes: int = 6, seed: int = 0,
                    noise: float = 0.03) -> SpectralScene:
    """A labelled synthetic scene of the first ``classes`` of :data:`CLASSES`; see the module docstring."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be in 2..{len(CLASSES)}, got {classes}.")
    rng = np.random.default_rng(seed)
    n_regions = 4 * classes
    centres = rng.uniform(0, 1, (n_regions, 2)) * (height, width)
    region_class = np.concatenate([np.arange(classes), rng.integers(0, classes, n_regions - classes)])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    warp = 0.06 * max(height, width)
    py = yy + warp * _smooth_field(rng, height, width, 30)
    px = xx + warp * _smooth_field(rng, height, width, 30)
    dist = np.hypot(py[..., None] - centres[:, 0], px[..., None] - centres[:, 1])  # (H, W, regions)
    order = np.argsort(dist, axis=-1)
    first, second = order[..., 0], order[..., 1]
    d1 = np.take_along_axis(dist, first[..., None], -1)[..., 0]
    d2 = np.take_along_axis(dist, second[..., None], -1)[..., 0]
    border = d2 - d1  # 0 on a region border
    c1, c2 = region_class[first], region_class[second]
    mix = 0.5 * np.exp(-border / 2.0)  # up to 50 % of the neighbour's spectrum at the border
    sig = _signatures(rng, classes, bands)
    illumination = 1 + 0.15 * _smooth_field(rng, height, width, 20)
    cube = ((1 - mix)[..., None] * sig[c1] + mix[..., None] * sig[c2]) * illumination[..., None]
    cube += rng.normal(0, noise, cube.shape)
    gt = c1 + 1
    gt[border < 1.5] = 0
    unlabelled_regions = rng.choice(np.arange(classes, n_regions), size=max(1, n_regions // 10), replace=False)
    gt[np.isin(first, unlabelled_regions)] = 0
    for c in range(classes):  # small scenes: a class whose regions are all border keeps its whole regions labelled
        if not (gt == c + 1).any():
            gt[c1 == c] = c + 1
    return SpectralScene(cube.astype(np.float32), gt, CLASSES[:classes])


def write_scene_mat(scene: SpectralScene, folder: Union[str, Path], name: str = "demo_scene") -> tuple[Path, Path]:
    """``<name>.mat`` (variable ``name``) and ``<name>_gt.mat`` (variable ``name_gt``), as the real datasets ship."""
    import scipy.io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, gt = folder / f"{name}.mat", folder / f"{name}_gt.mat"
    scipy.io.savemat(data, {name: scene.cube})
    scipy.io.savemat(gt, {f"{name}_gt": scene.gt.astype(np.uint8)})
    return data, gt
