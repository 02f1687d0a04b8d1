"""Shared test fixtures: the real media of ../shared/data, and the small synthetic data and model folders that
several test files use (written once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BEVT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _kernel_calibration_cache(tmp_path_factory: pytest.TempPathFactory):
    """The linear-kernel calibration (`bevt.kernels_bevt.linear_kernels`) caches its choice in a session file, not
    in the user's ~/.cache; the scripts the tests start inherit it (one calibration per thread count)."""
    previous = os.environ.get("BEVT_KERNEL_CACHE")
    os.environ["BEVT_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernel_cache") / "kernels.json")
    yield
    if previous is None:
        os.environ.pop("BEVT_KERNEL_CACHE", None)
    else:
        os.environ["BEVT_KERNEL_CACHE"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real videos/images of ../shared/data; tests using it skip when it is absent."""
    if not (SHARED_DATA / "videos").is_dir():
        pytest.skip(f"real test media not found at {SHARED_DATA} (set BEVT_SHARED_DATA)")
    return SHARED_DATA


# The three training scripts imported as modules (without running main), once per test module.
@pytest.fixture(scope="module")
def pretraining():
    return load_script("run_pretraining.py")


@pytest.fixture(scope="module")
def finetuning():
    return load_script("run_finetuning.py")


@pytest.fixture(scope="module")
def tokenizer_training():
    return load_script("run_tokenizer_training.py")


@pytest.fixture(scope="session")
def pretraining_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretraining demo's shards (`write_demo_pretraining_shards` defaults); runs copy them to their
    `<output_dir>/demo_data`, where `run_pretraining.py` finds them instead of writing them again."""
    from bevt.data.demo_pretraining import write_demo_pretraining_shards

    folder = tmp_path_factory.mktemp("pretraining_demo") / "demo_data"
    write_demo_pretraining_shards(folder)
    return folder


@pytest.fixture(scope="session")
def finetuning_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small fine-tuning demo shards: 48 training and 12 validation clips, 2 shards each, with labels.txt."""
    from bevt.data.demo_finetuning import write_demo_shards

    folder = tmp_path_factory.mktemp("finetuning_demo") / "demo_data"
    write_demo_shards(folder, num_train=48, num_validation=12)
    return folder


@pytest.fixture(scope="session")
def tiny_pretrained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining folder (BEVTForMaskedVideoModeling, preset "test": window 4x2x2, 8 frames, 64 px) with
    random, non-zero relative position bias tables, as run_pretraining.py writes it."""
    from bevt import BEVTConfig, BEVTForMaskedVideoModeling

    folder = tmp_path_factory.mktemp("pretrained")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_()
    model.save_pretrained(folder)
    return folder
