"""Helpers shared by several test files (imported as `helpers`: pytest puts tests/ on sys.path)."""

import builtins
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(filename: str) -> ModuleType:
    """Import a repo-root script (e.g. "run_pretraining.py") as a module, without running its main()."""
    spec = importlib.util.spec_from_file_location(Path(filename).stem, REPO / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A free TCP port on localhost (for `accelerate launch --main_process_port`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HostilePayload:
    """Unpickling this runs `os.system(touch marker)` or `builtins.eval(open(marker, "w"))`."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, marker

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


def tiny_pretraining_inputs() -> dict:
    """Seeded `BEVTForMaskedVideoModeling` inputs for the `test` preset (64 px, 8 frames, 64 ids): 2 videos with tube
    masks and token labels `(2, 8, 4, 4)`, 3 images with block masks and labels `(3, 4, 4)`."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(2, 8, 3, 64, 64, generator=g),
        "bool_masked_pos": torch.rand(2, 4, 4, 4, generator=g) < 0.5,
        "labels": torch.randint(0, 64, (2, 8, 4, 4), generator=g),
        "image_pixel_values": torch.randn(3, 3, 64, 64, generator=g),
        "image_bool_masked_pos": torch.rand(3, 4, 4, generator=g) < 0.5,
        "image_labels": torch.randint(0, 64, (3, 4, 4), generator=g),
    }


def run_in_process(script: ModuleType, output_dir: Path, args: list[str], demo_data: Path | None = None) -> int:
    """`script.main(["--output_dir", output_dir, *args])` in this process (no interpreter start-up), with the demo
    shards copied to `<output_dir>/demo_data` (where the scripts find them), restoring torch's thread count."""
    import torch

    if demo_data is not None and not (output_dir / "demo_data").exists():
        shutil.copytree(demo_data, output_dir / "demo_data")
    threads = torch.get_num_threads()
    try:
        return script.main(["--output_dir", str(output_dir), *args])
    finally:
        torch.set_num_threads(threads)
