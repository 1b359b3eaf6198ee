"""Helpers every layer may use: atomic file writes and JSON (:mod:`.io`), image files (:mod:`.images`), PNG figures
(:mod:`.figures`, imported on use: it loads matplotlib), errors shared by the tasks (:mod:`.errors`) and the
config-driven CLI (:mod:`.cli`)."""

from .errors import DatasetLayoutError, NotEnoughMemoryError, TrainingDiverged, UntrustedFileError
from .io import (
                 PIPELINE_CONFIG,
                 atomic_path,
                 load_safetensors,
                 open_safetensors,
                 read_pipeline_config,
                 recover_dir,
                 replace_dir,
                 save_json_atomic,
                 staged_dir,
                 torch_load_weights,
                 write_text_atomic,
)

__all__ = ["DatasetLayoutError", "NotEnoughMemoryError", "TrainingDiverged", "UntrustedFileError", "load_safetensors",
           "open_safetensors",
           "torch_load_weights", "PIPELINE_CONFIG", "atomic_path", "read_pipeline_config",
           "recover_dir", "replace_dir", "save_json_atomic", "staged_dir", "write_text_atomic"]
