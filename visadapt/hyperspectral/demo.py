"""``visadapt hsi train --demo``: a synthetic scene of the spectra world (:mod:`visadapt.utils.worlds.spectra`), and a
tiny model trained on it through the same ``.mat`` loader as real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from visadapt.utils.worlds.spectra import CLASSES, synthetic_scene, write_scene_mat

from .config import HSITrainConfig
from .report import run_summary
from .train import train

# Sized for 2 CPU cores: a 48-wide tiny model on 9×9 patches of 10 PCA components, 10 % of the labelled pixels.
DEMO_SETTINGS = dict(model="lola_specvit_tiny", pca_components=10, patch_size=9, train=0.1, epochs=30,
                     batch_size=32, grad_accum=1, lr=2e-3, warmup_epochs=2, t0=10, eta_min=1e-5, seed=0,
                     split_seed=0)


def demo_config(data: Path, gt: Path, **overrides) -> HSITrainConfig:
    return HSITrainConfig(data=str(data), data_key=data.stem, gt=str(gt), gt_key=gt.stem,
                          class_names=list(CLASSES[:6]), **{**DEMO_SETTINGS, **overrides})


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
