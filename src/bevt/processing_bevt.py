"""`BEVTVideoProcessor`: decode, sample, resize, crop and normalize videos for BEVT models.

A Transformers ``BaseVideoProcessor`` (saved as ``video_preprocessor_config.json``, loaded with
``AutoVideoProcessor`` once ``bevt`` is imported) whose output ``pixel_values`` ``(N, T, C, H, W)`` feeds
``BEVTModel`` / ``BEVTForVideoClassification`` directly, and which serves as the processor of
``pipeline("video-classification", model=folder)``.

Inputs (one video or a list of them):

* a file path (``str`` / ``os.PathLike``), an ``http(s)://`` URL, the encoded bytes, a binary file object
  (``open(path, "rb")``, ``io.BytesIO``), or a ``datasets`` video dict ``{"bytes": ..., "path": ...}``: decoded
  with :mod:`bevt.video_decoding` (decord, else torchcodec, else PyAV; ``video_backend=`` overrides), and only the
  sampled frames are decoded;
* a ``uint8`` (or float) array/tensor ``(T, H, W, C)`` or ``(T, C, H, W)`` (``C`` = 1, 3 or 4; a grayscale video
  ``(T, H, W)`` needs its channel axis: ``frames[..., None]``), or a list of PIL / array frames;
* a single PIL image or ``(H, W, C)`` / ``(C, H, W)`` array: a 1-frame video (a 3-D array is always one frame).

Pixel values: ``uint8`` frames (0-255) are rescaled by ``rescale_factor`` (1/255). So are float frames, as in every
Transformers processor: float frames already in [0, 1] need ``do_rescale=False`` (a warning says so when float
frames look rescaled, and when ``uint8`` frames are given with ``do_rescale=False``).

Frame sampling (:func:`bevt.frame_sampling.sample_frame_indices`): ``sampling_mode="dense"`` takes
``num_frames`` frames ``frame_interval`` apart (Kinetics style, e.g. 32x2 or 16x8), ``"uniform"`` one frame
from each of ``num_frames`` equal segments (Something-Something style). ``test_mode=True`` (the default)
is deterministic: evenly spaced clips / segment centres. ``test_mode=False`` draws random offsets from a
generator seeded with ``seed`` at every call (or torch's global RNG when ``seed`` is None). Videos shorter
than a clip loop their frames (index ``mod`` length).

Multi-view evaluation: ``num_clips`` clips x ``num_crops`` crops (1 = centre crop, 3 = left/centre/right
along the long side: top/centre/bottom for portrait videos) give ``V = num_clips * num_crops`` views per
video. ``pixel_values`` is then ``(B * V, T, C, H, W)``, ordered video by video, and within a video clip by
clip, crop by crop, so ``logits.view(B, V, -1)`` groups the views of each video;
:meth:`BEVTVideoProcessor.aggregate_views` averages them. With the defaults (``V = 1``) the output is
``(B, T, C, H, W)``. With ``V > 1`` the output also holds ``num_views`` ``(B,)`` (``return_num_views=True`` adds
it for ``V = 1`` too), which ``BEVTForVideoClassification`` takes to average the views of each video: so
``model(**processor(video))`` and ``pipeline("video-classification")`` score a video on all its views (the mean of
the per-view softmax scores, as the multi-view evaluation), whatever views the processor was saved with.

Geometry: resize the short side to ``size["shortest_edge"]`` (224 here; use 256 for the
"resize 256, centre crop 224" evaluation), crop ``crop_size`` (224x224), rescale to [0, 1] and normalize
with the ImageNet mean/std, as the official BEVT pipelines do.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    validate_kwargs,
)
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, group_videos_by_shape, reorder_videos

from .frame_sampling import SAMPLING_MODES, sample_frame_indices
from .video_decoding import VideoDecodingError, VideoReader

__all__ = ["BEVTVideoProcessor", "BEVTVideoProcessorKwargs"]

logger = logging.getLogger(__name__)

_SOURCE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview)


class BEVTVideoProcessorKwargs(VideosKwargs, total=False):
    """The Transformers video kwargs plus BEVT's sampling / multi-view options.

    Attributes:
        frame_interval: step between sampled frames in ``"dense"`` mode.
        sampling_mode: ``"dense"`` or ``"uniform"``.
        num_clips: clips per video.
        num_crops: crops per clip, 1 (centre) or 3 (along the long side).
        test_mode: deterministic sampling (True) or random offsets (False).
        video_backend: ``"decord"``, ``"torchcodec"``, ``"pyav"`` or None (automatic).
        seed: seed of the sampling generator when ``test_mode`` is False.
        return_num_views: add ``num_views`` ``(B,)`` to the output also for single-view processing (it is always
            there when a video has several views).
    """

    frame_interval: int | None
    sampling_mode: str | None
    num_clips: int | None
    num_crops: int | None
    test_mode: bool | None
    video_backend: str | None
    seed: int | None
    return_num_views: bool | None


class BEVTVideoProcessor(BaseVideoProcessor):
    r"""Video processor for BEVT: decoding, frame sampling, short-side resize, crop(s), ImageNet normalization.

    Args (all optional, also accepted per call):
        num_frames (`int`, defaults to 16): frames per clip (the model's ``T``).
        frame_interval (`int`, defaults to 8): frame step of ``"dense"`` sampling.
        sampling_mode (`str`, defaults to ``"dense"``): ``"dense"`` or ``"uniform"``.
        num_clips (`int`, defaults to 1), num_crops (`int`, 1 or 3, defaults to 1): test-time views.
        test_mode (`bool`, defaults to True): deterministic sampling; False samples random offsets.
        seed (`int`, *optional*): seed for random sampling (a new generator per call: reproducible calls).
        video_backend (`str`, *optional*): decoding backend, automatic when None.
        size (`dict`, defaults to ``{"shortest_edge": 224}``), crop_size (defaults to 224x224),
        resample (defaults to bilinear), image_mean / image_std (ImageNet), do_resize, do_center_crop,
        do_rescale, do_normalize, do_convert_rgb, do_sample_frames (defaults to True): as in Transformers.

    Returns (``__call__``):
        `BatchFeature` with ``pixel_values``: ``(B * num_clips * num_crops, T, C, crop_h, crop_w)`` float
        (a list of tensors when ``return_tensors`` is None), plus ``num_views`` ``(B,)`` when a video has several
        views (or ``return_num_views=True``) and ``video_metadata`` when ``return_metadata=True``.

    Example::

        processor = BEVTVideoProcessor(num_frames=32, frame_interval=2, num_clips=4, num_crops=3)
        inputs = processor("video.mp4", return_tensors="pt")  # pixel_values (12, 32, 3, 224, 224), num_views [12]
        scores = model(**inputs).logits.softmax(-1)          # (1, num_labels): the 12 views averaged
        per_view = model(pixel_values=inputs["pixel_values"]).logits                 # (12, num_labels)
        scores = processor.aggregate_views(per_view, 12)                             # the same (1, num_labels)
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 16
    frame_interval = 8
    sampling_mode = "dense"
    num_clips = 1
    num_crops = 1
    test_mode = True
    video_backend = None
    seed = None
    return_num_views = False
    valid_kwargs = BEVTVideoProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Unpack[BEVTVideoProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        self._check_sampling_options(
            self.num_frames, self.frame_interval, self.sampling_mode, self.num_clips, self.num_crops, self.fps
        )

    # ------------------------------------------------------------------------------------------ options

    @staticmethod
    def _check_sampling_options(
        num_frames: Any, frame_interval: Any, sampling_mode: Any, num_clips: Any, num_crops: Any, fps: Any
    ) -> None:
        for name, value in (
            ("num_frames", num_frames),
            ("frame_interval", frame_interval),
            ("num_clips", num_clips),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if sampling_mode not in SAMPLING_MODES:
            raise ValueError(f"sampling_mode must be one of {list(SAMPLING_MODES)}, got {sampling_mode!r}")
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre crop) or 3 (three crops), got {num_crops!r}")
        if fps is not None:
            raise ValueError(
                "BEVTVideoProcessor samples by frame count, not fps: use num_frames / frame_interval / sampling_mode"
            )

    @property
    def num_views(self) -> int:
        """Views per video with the configured options: ``num_clips * num_crops``."""
        return self.num_clips * self.num_crops

    @staticmethod
    def aggregate_views(logits: torch.Tensor, num_views: int, average: str = "prob") -> torch.Tensor:
        """Average a multi-view output ``(B * num_views, num_labels)`` to ``(B, num_labels)``.

        Args:
            logits: model logits, views of a video consecutive (the processor's order).
            num_views: views per video (``num_clips * num_crops``).
            average: ``"prob"`` averages softmax probabilities (mmaction2's default for multi-view testing),
                ``"logits"`` averages the raw logits.
        """
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.ndim != 2 or logits.shape[0] % num_views != 0:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} cannot be split into groups of {num_views} views"
            )
        grouped = logits.view(-1, num_views, logits.shape[-1])
        if average == "prob":
            return grouped.softmax(-1).mean(1)
        if average == "logits":
            return grouped.mean(1)
        raise ValueError(f"average must be 'prob' or 'logits', got {average!r}")

    # ------------------------------------------------------------------------------------------ entry point

    def preprocess(self, videos: Any, **kwargs: Unpack[BEVTVideoProcessorKwargs]) -> BatchFeature:
        """Decode/sample/transform ``videos``; see the class docstring for inputs and outputs."""
        validate_kwargs(
            captured_kwargs=kwargs.keys(),
            valid_processor_keys=list(self.valid_kwargs.__annotations__) + ["return_tensors"],
        )
        for name in self.valid_kwargs.__annotations__:
            kwargs.setdefault(name, getattr(self, name, None))

        sampling = {
            name: kwargs.pop(name)
            for name in ("num_frames", "frame_interval", "sampling_mode", "num_clips", "test_mode", "seed")
        }
        num_crops = kwargs.pop("num_crops")
        fps = kwargs.pop("fps")
        self._check_sampling_options(
            sampling["num_frames"],
            sampling["frame_interval"],
            sampling["sampling_mode"],
            sampling["num_clips"],
            num_crops,
            fps,
        )
        do_sample_frames = kwargs.pop("do_sample_frames")
        video_backend = kwargs.pop("video_backend")
        return_num_views = kwargs.pop("return_num_views")
        return_metadata = kwargs.pop("return_metadata")
        input_data_format = kwargs.pop("input_data_format")
        do_convert_rgb = kwargs.pop("do_convert_rgb")
        device = kwargs.pop("device")
        kwargs.pop("video_metadata")
        kwargs.pop("data_format")

        clips, metadata = self._load_clips(videos, do_sample_frames, video_backend, **sampling)
        num_clips = sampling["num_clips"] if do_sample_frames else 1
        clips = [
            self._to_tchw(clip, input_data_format, do_convert_rgb, device, index // num_clips)
            for index, clip in enumerate(clips)
        ]

        kwargs = self._standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        self._warn_about_rescaling(clips, kwargs.get("do_rescale"))
        batch = self._preprocess(clips, num_crops=num_crops, **kwargs)
        if return_num_views or num_clips * num_crops > 1:
            batch["num_views"] = torch.full((len(metadata),), num_clips * num_crops, dtype=torch.long)
        if return_metadata:
            batch["video_metadata"] = metadata
        return batch

    # ------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def _split_batch(videos: Any) -> list[Any]:
        """One entry per video: a source (path/URL/bytes/dict) or a frames array/tensor ``(T, ...)``."""
        from PIL import Image

        def is_frame(x: Any) -> bool:
            return isinstance(x, Image.Image) or (isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 3)

        def is_video(x: Any) -> bool:
            return (
                isinstance(x, _SOURCE_TYPES)
                or (hasattr(x, "read") and not isinstance(x, Image.Image))  # a binary file object
                or (isinstance(x, dict) and ("bytes" in x or "path" in x))
                or (isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 4)
            )

        if is_video(videos):
            return [videos]
        if isinstance(videos, np.ndarray | torch.Tensor) and videos.ndim == 5:
            return list(videos)
        if is_frame(videos):  # a single image: a 1-frame video
            BEVTVideoProcessor._check_frame(videos, 0)
            return [[videos]]
        if not isinstance(videos, list | tuple) or len(videos) == 0:
            raise ValueError(
                "videos must be a path, URL, bytes, a (T, H, W, C) array/tensor, a binary file object, a list of "
                f"frames, or a list of those; got {type(videos).__name__}"
                + (" (empty)" if isinstance(videos, list | tuple) else "")
            )
        if all(is_frame(f) for f in videos):
            for f in videos:
                BEVTVideoProcessor._check_frame(f, 0)
            return [list(videos)]
        out = []
        for i, item in enumerate(videos):
            if is_video(item):
                out.append(item)
            elif isinstance(item, list | tuple) and item and all(is_frame(f) for f in item):
                for f in item:
                    BEVTVideoProcessor._check_frame(f, i)
                out.append(list(item))
            else:
                raise ValueError(
                    f"video {i} of the batch has an unsupported type {type(item).__name__}: expected a path, URL, "
                    "bytes, a (T, H, W, C) array/tensor, a binary file object or a list of frames"
                )
        return out

    @staticmethod
    def _check_frame(frame: Any, index: int) -> None:
        """A 3-D array is one frame ``(H, W, C)`` / ``(C, H, W)``: refuse one without a channel axis (likely a
        grayscale video ``(T, H, W)``, which would otherwise be misread)."""
        if isinstance(frame, np.ndarray | torch.Tensor) and not (
            frame.shape[-1] in (1, 3, 4) or frame.shape[0] in (1, 3, 4)
        ):
            raise ValueError(
                f"video {index}: a 3-D array of shape {tuple(frame.shape)} is one frame (H, W, C) or (C, H, W), "
                "but none of its axes holds 1, 3 or 4 channels; a grayscale video (T, H, W) needs a channel axis: "
                "frames[..., None]"
            )

    @staticmethod
    def _frames_to_array(frames: list[Any], index: int) -> torch.Tensor:
        from PIL import Image

        arrays = [
            np.asarray(f.convert("RGB"))
            if isinstance(f, Image.Image)
            else (f.cpu().numpy() if isinstance(f, torch.Tensor) else f)
            for f in frames
        ]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"video {index}: its frames have different shapes {sorted(shapes)}")
        return torch.from_numpy(np.stack(arrays))

    @staticmethod
    def _resolve_source(item: Any) -> Any:
        """A path, bytes or file object for :class:`VideoReader` (URLs are downloaded).

        Raises:
            VideoDecodingError: a URL that cannot be downloaded (offline, refused, HTTP error), naming it.
        """
        if isinstance(item, dict):  # datasets Video(decode=False): {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
            if item is None:
                raise ValueError("a video dict needs non-empty 'bytes' or 'path'")
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            from huggingface_hub.utils import get_session

            try:
                response = get_session().get(item, follow_redirects=True)
                response.raise_for_status()
            except Exception as err:  # noqa: BLE001 - httpx / OSError / offline-mode errors alike
                raise VideoDecodingError(f"cannot download {item}: {type(err).__name__}: {err}") from err
            item = response.content
        return item

    def _load_clips(
        self,
        videos: Any,
        do_sample_frames: bool,
        video_backend: str | None,
        *,
        num_frames: int,
        frame_interval: int,
        sampling_mode: str,
        num_clips: int,
        test_mode: bool,
        seed: int | None,
    ) -> tuple[list[torch.Tensor], list[VideoMetadata]]:
        """Decode/sample every video: ``B * num_clips`` clips (frames last or first) and ``B`` metadata."""
        generator = torch.Generator().manual_seed(seed) if (seed is not None and not test_mode) else None

        def sample(total: int) -> list[list[int]]:
            if not do_sample_frames:
                return [list(range(total))]
            return sample_frame_indices(
                total,
                mode=sampling_mode,
                clip_len=num_frames,
                frame_interval=frame_interval,
                num_clips=num_clips,
                test_mode=test_mode,
                generator=generator,
            )

        clips: list[torch.Tensor] = []
        metadata: list[VideoMetadata] = []
        for index, item in enumerate(self._split_batch(videos)):
            if isinstance(item, list):
                item = self._frames_to_array(item, index)
            if isinstance(item, np.ndarray | torch.Tensor):
                frames = torch.as_tensor(item)
                if frames.ndim == 3:
                    frames = frames.unsqueeze(0)
                if frames.shape[0] == 0:
                    raise ValueError(
                        f"video {index} of the batch has no frames (shape {tuple(frames.shape)})"
                    )
                indices = sample(frames.shape[0])
                clips.extend(frames[idx] for idx in indices)
                metadata.append(
                    VideoMetadata(
                        total_num_frames=frames.shape[0], frames_indices=[i for c in indices for i in c]
                    )
                )
                continue
            try:
                source = self._resolve_source(item)
                with VideoReader(source, backend=video_backend) as reader:
                    indices = sample(reader.num_frames)
                    flat = [i for clip in indices for i in clip]
                    decoded = reader.get_batch(flat)
                    total, fps, backend = reader.num_frames, reader.fps, reader.backend
            except VideoDecodingError as err:
                raise VideoDecodingError(f"video {index} of the batch: {err}") from err
            clips.extend(decoded.split([len(c) for c in indices]))
            metadata.append(
                VideoMetadata(
                    total_num_frames=total,
                    fps=fps,
                    height=int(decoded.shape[1]),
                    width=int(decoded.shape[2]),
                    duration=total / fps if fps else None,
                    video_backend=backend,
                    frames_indices=flat,
                )
            )
        return clips, metadata

    @staticmethod
    def _to_tchw(
        clip: torch.Tensor,
        input_data_format: str | ChannelDimension | None,
        do_convert_rgb: bool | None,
        device: str | torch.device | None,
        index: int,
    ) -> torch.Tensor:
        """A clip as ``(T, 3, H, W)`` (uint8 or float, as given)."""
        if clip.ndim != 4:
            raise ValueError(
                f"video {index}: expected frames (T, H, W, C) or (T, C, H, W), got shape {tuple(clip.shape)}"
            )
        fmt = ChannelDimension(input_data_format) if input_data_format is not None else None
        if fmt is None:
            last, first = clip.shape[-1] in (1, 3, 4), clip.shape[1] in (1, 3, 4)
            if not (last or first):
                raise ValueError(
                    f"video {index}: cannot find the channel axis of frames shaped {tuple(clip.shape)}"
                )
            fmt = ChannelDimension.LAST if last else ChannelDimension.FIRST
        if fmt == ChannelDimension.LAST:
            clip = clip.permute(0, 3, 1, 2)
        if do_convert_rgb:
            if clip.shape[1] == 1:
                clip = clip.expand(-1, 3, -1, -1)
            elif clip.shape[1] == 4:
                clip = clip[:, :3]
        if clip.shape[1] != 3:
            raise ValueError(f"video {index}: expected 3 colour channels, got {clip.shape[1]}")
        clip = clip.contiguous()
        return clip.to(device) if device is not None else clip

    @staticmethod
    def _warn_about_rescaling(clips: list[torch.Tensor], do_rescale: bool | None) -> None:
        """Transformers' rule: ``do_rescale`` always multiplies by ``rescale_factor``; warn (once) when that looks
        wrong: float frames already in [0, 1] with ``do_rescale=True``, or ``uint8`` frames with ``do_rescale=False``."""
        if do_rescale:
            for clip in clips:
                if clip.is_floating_point() and bool(clip.min() >= 0) and bool(clip.max() <= 1):
                    logger.warning_once(
                        "It looks like you are trying to rescale already rescaled video frames: float pixel values in "
                        "[0, 1] are divided by 255 again. If the frames are in [0, 1], pass `do_rescale=False`."
                    )
                    return
        elif any(clip.dtype == torch.uint8 for clip in clips):
            logger.warning_once(
                "The video frames are uint8 (0-255) and `do_rescale=False`: they are normalized without rescaling to "
                "[0, 1]. Use `do_rescale=True` for uint8 frames."
            )

    # ------------------------------------------------------------------------------------------ transforms

    def _views(
        self, video: torch.Tensor, crop_size: SizeDict, num_crops: int, do_center_crop: bool
    ) -> list[torch.Tensor]:
        """Crops of a ``(T, C, H, W)`` clip: the centre one, or three along the long side."""
        if num_crops == 1:
            return [self.center_crop(video, crop_size) if do_center_crop else video]
        if crop_size.height is None or crop_size.width is None:
            raise ValueError(f"three-crop needs crop_size with height and width, got {crop_size}")
        crop_h, crop_w = crop_size.height, crop_size.width
        height, width = video.shape[-2:]
        if crop_h > height or crop_w > width:  # pad (centred) like center_crop does
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            video = tvF.pad(video, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
            height, width = video.shape[-2:]
        if width >= height:  # landscape: left / centre / right
            top = (height - crop_h) // 2
            boxes = [(top, left) for left in (0, (width - crop_w) // 2, width - crop_w)]
        else:  # portrait: top / centre / bottom
            left = (width - crop_w) // 2
            boxes = [(top, left) for top in (0, (height - crop_h) // 2, height - crop_h)]
        return [video[..., top : top + crop_h, left : left + crop_w] for top, left in boxes]

    def _preprocess(
        self,
        videos: list[torch.Tensor],
        do_resize: bool,
        size: SizeDict,
        resample: Any,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        num_crops: int = 1,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Resize, crop into views, rescale and normalize clips ``(T, C, H, W)``."""
        if do_resize:
            grouped, order = group_videos_by_shape(videos)
            videos = reorder_videos(
                {shape: self.resize(stack, size=size, resample=resample) for shape, stack in grouped.items()},
                order,
            )
        views = [
            view for video in videos for view in self._views(video, crop_size, num_crops, do_center_crop)
        ]
        grouped, order = group_videos_by_shape(views)
        normalized = {
            shape: self.rescale_and_normalize(
                stack, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            for shape, stack in grouped.items()
        }
        views = reorder_videos(normalized, order)
        return BatchFeature(data={"pixel_values": views}, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------ Transformers hooks

    def sample_frames(
        self, metadata: VideoMetadata, num_frames: int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Frame indices for a video described by ``metadata`` (all clips, concatenated), BEVT's way."""
        clips = sample_frame_indices(
            int(metadata.total_num_frames),
            mode=kwargs.get("sampling_mode") or self.sampling_mode,
            clip_len=num_frames or self.num_frames,
            frame_interval=kwargs.get("frame_interval") or self.frame_interval,
            num_clips=kwargs.get("num_clips") or self.num_clips,
            test_mode=self.test_mode if kwargs.get("test_mode") is None else kwargs["test_mode"],
        )
        return np.asarray([i for clip in clips for i in clip], dtype=np.int64)

    def fetch_videos(self, video_url_or_urls: Any, sample_indices_fn: Any = None) -> Any:
        """Decode videos with BEVT's decoders (decord / torchcodec / PyAV) instead of Transformers' torchcodec path.

        Returns ``(frames uint8 (T, H, W, 3), VideoMetadata)``, or two lists for a list input.
        """
        if isinstance(video_url_or_urls, list):
            return list(
                zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls])
            )
        with VideoReader(self._resolve_source(video_url_or_urls), backend=self.video_backend) as reader:
            metadata = VideoMetadata(
                total_num_frames=reader.num_frames,
                fps=reader.fps,
                duration=reader.num_frames / reader.fps if reader.fps else None,
                video_backend=reader.backend,
            )
            if sample_indices_fn is not None:
                indices = [int(i) for i in sample_indices_fn(metadata=metadata)]
            else:
                indices = list(range(reader.num_frames))
            frames = reader.get_batch(indices)
        metadata.frames_indices = indices
        metadata.height, metadata.width = int(frames.shape[1]), int(frames.shape[2])
        return frames.numpy(), metadata
