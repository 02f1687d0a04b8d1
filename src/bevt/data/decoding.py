"""Video/image decoding: see :mod:`bevt.video_decoding` (a top-level module so that the video processor, which
uses it, can be copied next to a saved model for `trust_remote_code` loading)."""

from ..video_decoding import *  # noqa: F403
from ..video_decoding import __all__  # noqa: F401
