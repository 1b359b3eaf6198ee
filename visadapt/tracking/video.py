"""Frames in and annotated frames out for ``visadapt track run``: video files through PyAV (``av``, the optional
``video`` extra), frame folders through Pillow."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from visadapt.utils import atomic_path

from .datasets import IMAGE_SUFFIXES, read_frame

BOX_COLOUR = (255, 40, 40)


def _av():
    try:
        import av
    except ImportError:
        raise ImportError('Reading and writing video files needs PyAV: pip install "visadapt[video]" (or pass a '
                          "folder of frames).") from None
    return av


def read_frames(source: str | Path) -> tuple[list[np.ndarray], float]:
    """(H, W, 3) uint8 RGB frames of a video file or a folder of images (sorted by name), and the frame rate (25
    for a folder)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{source} holds no frames ({', '.join(IMAGE_SUFFIXES)}).")
        return [read_frame(path) for path in files], 25.0
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such video file or frame folder.")
    av = _av()
    try:
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 25)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{source} could not be read as a video ({err}); pass a video file or a frame folder.") \
            from None
    if not frames:
        raise ValueError(f"{source} holds no video frames.")
    return frames, fps


def draw_box(frame: np.ndarray, box: Sequence[float], colour=BOX_COLOUR, width: int = 2) -> np.ndarray:
    """A copy of ``frame`` with the xywh ``box`` drawn."""
    img = Image.fromarray(np.ascontiguousarray(frame))
    x, y, w, h = (float(v) for v in box)
    ImageDraw.Draw(img).rectangle([x, y, x + w, y + h], outline=colour, width=width)
    return np.asarray(img)


def write_annotated(frames: Sequence[np.ndarray], boxes: np.ndarray, out: str | Path, fps: float = 25.0,
                    as_video: bool = True) -> Path:
    """Frames with their boxes drawn: ``out/tracked.mp4`` (H.264 through PyAV, MPEG-4 Part 2 where the FFmpeg build
    has no H.264 encoder) or, with ``as_video=False``, ``out/frames/00000001.jpg …``. Returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = [draw_box(f, b) for f, b in zip(frames, boxes)]
    if not as_video:
        folder = out / "frames"
        folder.mkdir(exist_ok=True)
        for i, frame in enumerate(drawn, 1):
            with atomic_path(folder / f"{i:08d}.jpg") as tmp:
                Image.fromarray(frame).save(tmp, quality=92)
        return folder
    av = _av()
    h, w = drawn[0].shape[:2]
    path = out / "tracked.mp4"
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=round(fps))
            stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sides
            stream.pix_fmt = "yuv420p"
            for frame in drawn:
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h - h % 2, :w - w % 2]),
                                                         format="rgb24")
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode())
    return path
