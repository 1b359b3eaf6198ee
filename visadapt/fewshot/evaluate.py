"""Top-1 accuracy of a CLIP classifier over a dataset's test split, with or without its adapter."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageDataset, Item
from .model import LOGIT_SCALE, TEMPLATE, encode_images, encode_text, prompts


class ClipClassifier(nn.Module):
    """CLIP as a classifier: logits = logit_scale · cos(image, class text). Wrapping both towers in one forward lets
    accelerate's DDP wrapper and autocast see the whole step."""

    def __init__(self, clip: nn.Module, logit_scale: Optional[float] = LOGIT_SCALE) -> None:
        """``logit_scale=None`` takes the model's own learned scale (CLIP-LoRA fixes 100, which suits OpenAI CLIP,
        whose learned scale is 100)."""
        super().__init__()
        self.clip = clip
        self.logit_scale = float(clip.logit_scale.exp()) if logit_scale is None else logit_scale

    def forward(self, images: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                text_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (N, 3, H, W) and class tokens (C, context) or cached text_features (C, D) → logits (N, C)."""
        if text_features is None:
            text_features = encode_text(self.clip, tokens)
        return self.logit_scale * encode_images(self.clip, images) @ text_features.T


def adapter_disabled(clip: nn.Module):
    """Context in which a peft model runs as its base model (a no-op for a plain model)."""
    return clip.disable_adapter() if hasattr(clip, "disable_adapter") else nullcontext()


@torch.no_grad()
def class_features(clip: nn.Module, tokenizer, classnames: Sequence[str], template: str = TEMPLATE,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, D) normalised text embeddings of ``template`` filled with each class name."""
    return encode_text(clip, tokenizer(prompts(classnames, template)).to(device))


@torch.no_grad()
def top1(classifier: ClipClassifier, tokenizer, items: Sequence[Item], classnames: Sequence[str], transform,
         template: str = TEMPLATE, batch_size: int = 256, workers: int = 0, accelerator=None,
         desc: str = "eval") -> float:
    """Top-1 accuracy (in %) over ``items``. With an ``accelerator`` the data is sharded over processes."""
    was_training = classifier.training
    classifier.eval()
    device = accelerator.device if accelerator else next(classifier.parameters()).device
    clip = classifier.module.clip if hasattr(classifier, "module") else classifier.clip
    text = class_features(clip, tokenizer, classnames, template, device)
    loader = DataLoader(ImageDataset(items, transform), batch_size=batch_size, num_workers=workers)
    if accelerator:
        loader = accelerator.prepare(loader)
    correct = total = 0
    main = accelerator is None or accelerator.is_main_process
    autocast = accelerator.autocast() if accelerator else nullcontext()
    with autocast:
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=not main):
            images, labels = images.to(device), labels.to(device)
            preds = classifier(images, text_features=text).argmax(-1)
            if accelerator:
                preds, labels = accelerator.gather_for_metrics((preds, labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
    classifier.train(was_training)
    return 100.0 * correct / max(total, 1)
