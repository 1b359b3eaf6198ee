"""The embedded worlds: procedural data that needs no download, and the small models shipped pretrained on them.

Each task's ``--demo`` takes one of these worlds and runs the task on it. The worlds are helpers below the tasks
(in :mod:`visadapt.utils`): they may use the other helpers (and numpy, PIL, torch, open_clip, timm, diffusers),
never an adapter or a task.

===============  =========================================================  ========================================
world            what it draws; what it ships                               how the shipped model was pretrained
===============  =========================================================  ========================================
:mod:`.shapes`   one flat shape an image (15 shapes: 10 seen, 5 held out;   ``python pretrain/demo_clip.py``, on
                 8 colours, 4 textures) with varied captions; ships         seen shapes only (about 13 minutes on
                 ``demo_clip/``, the demo CLIP (open_clip ``local-dir:``,   one CPU core)
                 ``visadapt-demo-clip``, 1.8 M parameters) of the few-shot
                 and incremental demos
:mod:`.shapes`   the pattern world: 15 (shape, coarse texture kind)         nothing to pretrain: the incremental demo
                 classes, the incremental demo's (the demo CLIP reads       adapts the demo CLIP to it
                 their kinds near chance): :func:`~.pattern_samples`
:mod:`.shapes`   canvases of one or two shapes, captioned; ships            ``OMP_NUM_THREADS=1 python
                 ``world_model/``, the world model (a tiny Stable           pretrain/world_model.py`` on canvases of
                 Diffusion pipeline, 7.9 MB of fp16 safetensors) that       seen shapes: 32.6 min from scratch, then
                 draws them from prompts: the composer app's default,       94.5 min continued with ``--init``;
                 judged by :mod:`.judge`                                    shape recognition 81.9 %
:mod:`.video`    textured shapes moving among distractors (occlusion,       ``python pretrain/demo_vit.py``, as a
                 scale change, out of view), in the GOT-10k layout; ships   whole tracker on the ``pretrain`` kind
                 ``demo_vit/``, the demo ViT (timm, DINOv2 layout, 0.2 M    (16 minutes, 1,683 steps; held-out AO
                 parameters), the tracking demo's backbone                  53.7; its ``config.json`` records the
                                                                            run)
:mod:`.spectra`  synthetic hyperspectral scenes (~100 bands, up to 8        nothing to pretrain: the hyperspectral
                 classes); ships nothing                                    demo trains its tiny model from scratch
===============  =========================================================  ========================================

:mod:`.models` holds the shipped folders' paths and loaders (:func:`~.models.load_demo_vit`,
:func:`~.models.load_world_model`). The pretraining scripts live in the repository's ``pretrain/`` folder, not in
the package: they train with task code (the tracking demo ViT is pretrained as a LoRAT tracker, the world model's
tokenizer comes from the diffusion task), which a world may not import. Each script's docstring gives its command
and settings.
"""
