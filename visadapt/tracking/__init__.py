"""Visual object tracking with LoRAT (Lin et al., ECCV 2024, arXiv 2403.05231; official code
github.com/LitingLin/LoRAT): a one-stream DINOv2 tracker with LoRA, as a Python API.

The names below load on first use, so importing the package does not import torch.
"""

from __future__ import annotations

from visadapt.utils.lazy import lazy_exports

_HOMES = {"LoRAT": ".model", "LoRATVariant": ".model", "VARIANTS": ".model", "build_lorat": ".model",
          "add_adapter": ".model", "merge": ".model", "lorat_adapter_config": ".model",
          "parameter_counts": ".model", "param_groups": ".model",
          "load_official": ".checkpoint", "read_state_dict": ".checkpoint",
          "ope_sequence": ".metrics", "ope_dataset": ".metrics", "got10k_scores": ".metrics",
          "plot_success_precision": ".metrics", "Tracker": ".tracker", "decode_best": ".tracker",
          "TrackConfig": ".config", "train": ".train", "TrackTrainer": ".train", "TrainingPairs": ".sampling",
          "PairSettings": ".sampling", "evaluate_tracker": ".evaluate"}

__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
