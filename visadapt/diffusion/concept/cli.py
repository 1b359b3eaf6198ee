"""``visadapt concept train``: DreamBooth-style concept LoRAs for SD-1.x/2.x and SDXL pipelines.

The options are the fields of :class:`visadapt.diffusion.concept.config.ConceptTrainConfig`. torch and diffusers are
imported when the command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse

from visadapt.utils.cli import add_train_command, config_from_args

from .config import ConceptTrainConfig


def add_commands(commands: argparse._SubParsersAction) -> None:
    concept = commands.add_parser("concept", help="train concept LoRAs (DreamBooth-style) for the composer",
                                  description="Concept LoRAs for diffusers SD-1.x/2.x and SDXL pipelines, trained "
                                              "on a few images with a trigger word, exported to diffusers and kohya "
                                              "files that the composer pipelines and the app load as concepts.")
    sub = concept.add_subparsers(dest="concept_command", metavar="COMMAND", required=True)
    add_train_command(sub, ConceptTrainConfig, _train,
                      help="train one concept; writes its LoRA files, samples and loss curve")


def _train(args: argparse.Namespace) -> int:
    from .train import train_concept

    r = train_concept(config_from_args(ConceptTrainConfig, args), args.out, resume=args.resume)
    print(f"concept {r['concept']}: loss on the evaluation batch {r['eval_loss_before']:.4f} → "
          f"{r['eval_loss_after']:.4f} after {r['steps']} steps; LoRA files in {args.out}: "
          + ", ".join(r["lora_files"].values()))
    return 0
