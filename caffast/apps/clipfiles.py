"""Clips and volumes as model inputs: video files, folders of frames and .npy volumes, found in a
folder tree and turned into the (C, D, H, W) tensor a 3-D model takes, beside image files.

What an input is (`input_kind`): a folder is a clip of frames only when asked (--input-kind frames),
since a folder of photos is no clip; a file by its suffix (VIDEO_SUFFIXES, VOLUME_SUFFIXES, else an
image), or as asked.

- A clip (a video, or a folder of image files in natural name order: frame2.png before frame10.png):
  `preprocessing.frames` frames sampled evenly from first to last (frame round(i (n - 1) / (k - 1))
  of n for i < k; frames repeat when the clip is shorter), each read in [0, 1], resized as
  torchvision's video transforms resize (bilinear, no antialiasing) to `preprocessing.resize`,
  centre-cropped to size x size and normalized by the mean and std; the whole video is decoded.
- A volume (.npy, (D, H, W) or (C, D, H, W), any real dtype, finite): scaled per channel over its
  voxels as `preprocessing.volume` says ("zscore": mean 0 and standard deviation 1, "minmax": [0, 1],
  "none": as it is), neither resized nor cropped; one channel is repeated to fill the channels of
  the model's first convolution.

Videos are decoded by torchvision.io.read_video where torchvision has it and PyAV is installed, else
by torchcodec, else by OpenCV; with none, reading one is a VideoDecoderMissing error that says what
to install.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models.preprocessing import IMAGENET, Preprocessing
from .imagefiles import IMAGE_SUFFIXES, ImageReadError, PathLike, find_images, open_picture, read_image, walk_data

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ogv")
VOLUME_SUFFIXES = (".npy",)
INPUT_KINDS = ("image", "frames", "video", "volume")
CLIP_KINDS = ("frames", "video", "volume")  # inputs of models that take (N, C, D, H, W)


class VideoDecoderMissing(ImageReadError):
    """No video decoder is installed: the message names what to install, and the frames' way round."""


def input_kind(path: PathLike, given: Optional[str] = None) -> str:
    """What the input at `path` is: `given` (an --input-kind), else a video or a volume by its
    suffix, else an image.  A folder is a clip of frames only when `given` says "frames"."""
    if os.path.isdir(path):
        if given != "frames":
            raise ImageReadError(f"{os.fspath(path)!r} is a folder: caffast run explains the images in a folder; "
                                 "with a model that takes clips, --input-kind frames explains them as the frames of "
                                 "one clip")  # fmt: skip
        return "frames"
    if given == "frames":
        raise ImageReadError(f"--input-kind frames takes folders of frames; {os.fspath(path)!r} is not a folder")
    if given is not None:
        return given
    name = os.fspath(path).lower()
    return "video" if name.endswith(VIDEO_SUFFIXES) else "volume" if name.endswith(VOLUME_SUFFIXES) else "image"


def find_inputs(
    root: PathLike, kind: Optional[str], exclude: Optional[PathLike] = None, run_folders: Optional[list[str]] = None
) -> list[str]:
    """The inputs under `root` of `kind`, relative and sorted: image files ("image"), videos or .npy
    volumes ("video", "volume", or None for both), or the folders that directly hold image files
    ("frames"; images in `root` itself belong to no clip and are left out).  What is left out
    otherwise is what caffast.apps.imagefiles.find_images leaves out."""
    if kind == "image":
        return find_images(root, exclude, run_folders)
    found = []
    for folder, names in walk_data(root, exclude, run_folders):
        if kind == "frames":
            if folder and any(name.lower().endswith(IMAGE_SUFFIXES) for name in names):
                found.append(folder)
            continue
        suffixes = {"video": VIDEO_SUFFIXES, "volume": VOLUME_SUFFIXES}.get(kind or "", VIDEO_SUFFIXES + VOLUME_SUFFIXES)
        found += [(Path(folder) / name).as_posix() for name in names if name.lower().endswith(suffixes)]
    return sorted(found)


def read_input(
    path: PathLike, preprocessing: Preprocessing = IMAGENET, kind: Optional[str] = None, channels: Optional[int] = None
) -> tuple[np.ndarray, torch.Tensor]:
    """The input as the model sees it: the picture to draw maps over, (H, W, 3) for an image and
    (D, H, W, 3) for a clip or a volume, float in [0, 1], and the model's input tensor, (3, H, W) or
    (C, D, H, W).  `kind` as `input_kind` takes it; `channels`: those of the model's first
    convolution (a volume's single channel is repeated to fill them).  Raises ImageReadError."""
    kind = input_kind(path, kind)
    problem = model_input_problem(path, kind, preprocessing.takes_clips)
    if problem is not None:
        raise ImageReadError(problem)
    if kind == "image":
        return read_image(path, preprocessing)
    if kind == "volume":
        return read_volume(path, preprocessing, channels)
    frames = read_frames_folder(path, preprocessing.frames) if kind == "frames" else read_video(path, preprocessing.frames)
    return clip_tensor(frames, preprocessing)


def model_input_problem(path: PathLike, kind: str, takes_clips: bool, model: str = "this model") -> Optional[str]:
    """Why a model that takes clips (or images, `takes_clips` False) cannot take the input, or None."""
    name = os.fspath(path)
    if kind != "image" and not takes_clips:
        what = "a volume" if kind == "volume" else "a clip"
        return (f"{name!r} is {what}, and {model} takes images: pass a model that takes clips (--arch r3d_18, "
                "mc3_18 or r2plus1d_18), or image files")
    if kind == "image" and takes_clips:
        return (f"{name!r} is an image, and {model} takes clips: pass a video, a .npy volume or a folder of frames "
                "with --input-kind frames, or a model that takes images (--arch resnet50, ...)")
    return None


def sample_frames(count: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread evenly over `count` frames, first and last included."""
    return [round(i * (count - 1) / (wanted - 1)) if wanted > 1 else 0 for i in range(wanted)]


def clip_tensor(frames: torch.Tensor, preprocessing: Preprocessing) -> tuple[np.ndarray, torch.Tensor]:
    """Sampled frames (D, 3, H, W) in [0, 1] as the model sees them: the (D, h, w, 3) picture after
    the resize and crop, and the normalized (3, D, h, w) tensor."""
    from torchvision.transforms import functional as TF

    interpolation = TF.InterpolationMode(preprocessing.interpolation)
    resize = list(preprocessing.resize or (preprocessing.size,))
    frames = TF.resize(frames, resize, interpolation, antialias=False)
    frames = TF.center_crop(frames, [preprocessing.size, preprocessing.size]).clamp(0, 1)
    tensor = TF.normalize(frames, list(preprocessing.mean), list(preprocessing.std))
    return frames.permute(0, 2, 3, 1).numpy(), tensor.permute(1, 0, 2, 3).contiguous()


def _natural_key(name: str) -> list[object]:
    """frame2.png before frame10.png: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: PathLike) -> list[str]:
    """The image files directly in `folder` (not hidden), in natural name order: the clip's frames."""
    names = [name for name in os.listdir(folder) if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(names, key=_natural_key)


def read_frames_folder(folder: PathLike, frames: Optional[int]) -> torch.Tensor:
    """The sampled frames of a folder of image files, (D, 3, H, W) in [0, 1]."""
    from torchvision.transforms import functional as TF

    if not os.path.isdir(folder):
        raise ImageReadError(f"folder of frames {os.fspath(folder)!r} does not exist")
    names = frame_files(folder)
    if not names:
        raise ImageReadError(f"folder {os.fspath(folder)!r} holds no frames (image files: {' '.join(IMAGE_SUFFIXES)})")
    chosen = [names[i] for i in sample_frames(len(names), frames or len(names))]
    pictures = [TF.to_tensor(open_picture(os.path.join(folder, name))).expand(3, -1, -1) for name in chosen]
    sizes = {tuple(picture.shape[1:]) for picture in pictures}
    if len(sizes) > 1:
        shown = ", ".join(f"{width} x {height}" for height, width in sorted(sizes))
        raise ImageReadError(f"the frames in {os.fspath(folder)!r} differ in size ({shown}): a clip's frames must "
                             "all be of one size")  # fmt: skip
    return torch.stack(pictures)


def video_decoder() -> Optional[str]:
    """The decoder read_video uses: "torchvision" (read_video with PyAV), "torchcodec", "opencv", or None."""
    import torchvision.io

    if hasattr(torchvision.io, "read_video") and importlib.util.find_spec("av") is not None:
        return "torchvision"
    for module, name in (("torchcodec", "torchcodec"), ("cv2", "opencv")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


NO_DECODER = (
    "no video decoder is installed: pip install av (torchvision.io.read_video decodes with it, in torchvision "
    "before 0.22), pip install torchcodec, or pip install opencv-python-headless; or extract the frames "
    "(ffmpeg -i VIDEO frames/%05d.png) and pass their folder with --input-kind frames"
)


def read_video(path: PathLike, frames: Optional[int]) -> torch.Tensor:
    """The sampled frames of a video file, (D, 3, H, W) in [0, 1]."""
    name = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"video {name!r} does not exist")
    decoder = video_decoder()
    if decoder is None:
        raise VideoDecoderMissing(f"cannot read video {name!r}: {NO_DECODER}")
    try:
        decoded = _decode(name, decoder)  # (T, H, W, 3) uint8
    except Exception as error:  # each decoder raises its own kinds
        raise ImageReadError(f"cannot read video {name!r} with {decoder}: {error}") from None
    if len(decoded) == 0:
        raise ImageReadError(f"video {name!r} holds no frames that {decoder} can decode")
    chosen = decoded[sample_frames(len(decoded), frames or len(decoded))]
    return chosen.permute(0, 3, 1, 2).float() / 255


def _decode(path: str, decoder: str) -> torch.Tensor:
    """Every frame of the video as (T, H, W, 3) uint8 RGB."""
    if decoder == "torchvision":
        import torchvision.io

        return torchvision.io.read_video(path, pts_unit="sec", output_format="THWC")[0]
    if decoder == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        return VideoDecoder(path, dimension_order="NHWC")[:]
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError("OpenCV cannot open it (not a video, or a codec its FFmpeg lacks)")
    pictures = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            pictures.append(torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()
    return torch.stack(pictures) if pictures else torch.zeros(0, 1, 1, 3, dtype=torch.uint8)


def read_volume(
    path: PathLike, preprocessing: Preprocessing, channels: Optional[int] = None
) -> tuple[np.ndarray, torch.Tensor]:
    """A .npy volume: its grey (D, H, W, 3) picture (the mean over channels, min-max scaled over the
    volume) and the scaled (C, D, H, W) float32 tensor (the module docstring says how)."""
    name = os.fspath(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ImageReadError(f"volume {name!r} does not exist") from None
    except (OSError, ValueError, EOFError) as error:
        raise ImageReadError(f"cannot read volume {name!r} as a .npy array: {error}") from None
    if array.ndim not in (3, 4) or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ImageReadError(f"volume {name!r} is a {array.dtype} array of shape {array.shape}: save a real-valued "
                             "(D, H, W) or (C, D, H, W) array")  # fmt: skip
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(volume).all():
        raise ImageReadError(f"volume {name!r} holds NaN or infinite values")
    volume = volume[None] if volume.dim() == 3 else volume
    if channels is not None and volume.shape[0] != channels:
        if volume.shape[0] != 1:
            raise ImageReadError(f"volume {name!r} has {volume.shape[0]} channels and the model takes {channels}: "
                                 "save it with 1 channel (repeated to fill them) or with the model's")  # fmt: skip
        volume = volume.expand(channels, -1, -1, -1)
    grey = volume.mean(0).double()
    grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-12)
    return grey[..., None].expand(-1, -1, -1, 3).numpy(), scale_volume(volume, preprocessing.volume or "none")


def scale_volume(volume: torch.Tensor, scaling: str) -> torch.Tensor:
    """(C, D, H, W) scaled per channel over its voxels: "zscore" (a constant channel only centred),
    "minmax" (a constant channel to 0), or "none"."""
    volume = volume.float()
    if scaling == "none":
        return volume.contiguous()
    flat = volume.flatten(1)
    if scaling == "zscore":
        mean, spread = flat.mean(1), flat.std(1, unbiased=False)
    else:
        mean, spread = flat.amin(1), flat.amax(1) - flat.amin(1)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return ((volume - mean[:, None, None, None]) / spread[:, None, None, None]).contiguous()
