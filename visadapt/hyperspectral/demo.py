"""``visadapt hsi train --demo``: a synthetic hyperspectral scene the project generates, and a tiny model trained on it.

The scene (:func:`synthetic_scene`): irregular regions (a warped Voronoi partition) of K classes, each with its own
smooth reflectance spectrum over ~100 bands (400–1000 nm; a few absorption dips and a red edge, some classes close
to each other); pixels near region borders mix the two nearest classes' spectra, a smooth illumination field scales
them, and sensor noise is added. Pixels close to borders and a few whole regions stay unlabelled (0), as in real
ground truth. The demo writes the scene as ``.mat`` files and trains through the same loader as real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .config import HSITrainConfig
from .data import Scene, scene_from_arrays
from .report import run_summary
from .train import train

DEMO_CLASSES = ("water", "asphalt", "grass", "trees", "crop A", "crop B", "bare soil", "roof")
# Sized for 2 CPU cores: a 48-wide tiny model on 9×9 patches of 10 PCA components, 10 % of the labelled pixels.
DEMO_SETTINGS = dict(model="lola_specvit_tiny", pca_components=10, patch_size=9, train=0.1, epochs=30,
                     batch_size=32, grad_accum=1, lr=2e-3, warmup_epochs=2, t0=10, eta_min=1e-5, seed=0,
                     split_seed=0)


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
                    noise: float = 0.03) -> Scene:
    """A labelled synthetic scene; see the module docstring."""
    if not 2 <= classes <= len(DEMO_CLASSES):
        raise ValueError(f"classes must be in 2..{len(DEMO_CLASSES)}, got {classes}.")
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
    return scene_from_arrays(cube.astype(np.float32), gt, "synthetic", DEMO_CLASSES[:classes])


def write_scene_mat(scene: Scene, folder: Union[str, Path], name: str = "demo_scene") -> tuple[Path, Path]:
    """``<name>.mat`` (variable ``name``) and ``<name>_gt.mat`` (variable ``name_gt``), as the real datasets ship."""
    import scipy.io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, gt = folder / f"{name}.mat", folder / f"{name}_gt.mat"
    scipy.io.savemat(data, {name: scene.cube})
    scipy.io.savemat(gt, {f"{name}_gt": scene.gt.astype(np.uint8)})
    return data, gt


def demo_config(data: Path, gt: Path, **overrides) -> HSITrainConfig:
    return HSITrainConfig(data=str(data), data_key=data.stem, gt=str(gt), gt_key=gt.stem,
                          class_names=list(DEMO_CLASSES[:6]), **{**DEMO_SETTINGS, **overrides})


def run_demo(out: Union[str, Path], resume: bool = False, **overrides) -> dict:
    out = Path(out)
    data, gt = write_scene_mat(synthetic_scene(), out / "data")
    settings = {**DEMO_SETTINGS, **overrides}
    print(f"Synthetic scene written to {out / 'data'}; training {settings['model']} "
          f"({', '.join(f'{k}={v}' for k, v in settings.items() if k != 'model')}).")
    results = train(demo_config(data, gt, **overrides), out, resume=resume)
    print()
    print(run_summary(results))
    print(f"\nReport: {out / 'report.md'}  class map: {out / 'class_map.png'}  results: {out / 'results.json'}")
    return results
