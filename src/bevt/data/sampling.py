"""Frame sampling: see :mod:`bevt.frame_sampling` (a top-level module so that the video processor, which uses it,
can be copied next to a saved model for `trust_remote_code` loading)."""

from ..frame_sampling import *  # noqa: F403
from ..frame_sampling import __all__  # noqa: F401
