"""Block (BEiT) and tube (BEVT) mask generators: property tests over many seeds, and the PNG helper."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bevt.masking import BlockMaskGenerator, TubeMaskGenerator, mask_to_pixels, save_mask_grid


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _isolated_patches(mask: torch.Tensor) -> int:
    """Masked patches with no masked 4-neighbour."""
    m = mask.numpy()
    padded = np.pad(m, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return int((m & ~neighbours).sum())


# --------------------------------------------------------------------------------------------- block


def test_block_mask_defaults_exact_count_and_blocks() -> None:
    gen = BlockMaskGenerator()
    assert (gen.height, gen.width, gen.num_masking_patches, gen.min_num_patches) == (14, 14, 98, 16)
    assert gen.max_num_patches == 98 and gen.max_aspect == pytest.approx(1 / 0.3)
    isolated = 0
    for seed in range(300):
        mask = gen(_gen(seed))
        assert mask.dtype == torch.bool and mask.shape == (14, 14)
        assert int(mask.sum()) == 98
        isolated += _isolated_patches(mask)
    assert isolated < 30  # made of blocks; a lone patch is rare (a last tiny block of BEiT's algorithm)


@pytest.mark.parametrize(
    ("height", "width", "count", "min_patches"),
    [
        (14, 14, 0, 16),
        (14, 14, 1, 16),
        (14, 14, 150, 16),
        (14, 14, 196, 16),
        (7, 7, 37, 4),
        (4, 9, 20, 4),
        (1, 1, 1, 1),
    ],
)
def test_block_mask_exact_count_for_any_setting(
    height: int, width: int, count: int, min_patches: int
) -> None:
    gen = BlockMaskGenerator(height, width, num_masking_patches=count, min_num_patches=min_patches)
    for seed in range(40):
        mask = gen(_gen(seed))
        assert mask.shape == (height, width) and int(mask.sum()) == count


def test_block_mask_seeding() -> None:
    gen = BlockMaskGenerator()
    assert torch.equal(gen(_gen(3)), gen(_gen(3)))
    assert len({tuple(gen(_gen(s)).flatten().tolist()) for s in range(20)}) == 20
    # constructor seed: a reproducible sequence
    a, b = BlockMaskGenerator(seed=5), BlockMaskGenerator(seed=5)
    first = [a() for _ in range(3)]
    assert all(torch.equal(x, b()) for x in first)
    assert not torch.equal(first[0], first[1])
    # no seed: torch's global RNG
    torch.manual_seed(11)
    x = gen()
    torch.manual_seed(11)
    assert torch.equal(x, gen())


def test_block_mask_aspect_is_height_over_width() -> None:
    """A fixed area and aspect give one exact rectangle: aspect 1 -> 4x4, aspect 4 -> 8 rows x 2 columns."""
    for aspect, shape in ((1.0, (4, 4)), (4.0, (8, 2)), (0.25, (2, 8))):
        gen = BlockMaskGenerator(
            14, 14, num_masking_patches=16, min_num_patches=16, min_aspect=aspect, max_aspect=aspect
        )
        tops_lefts = set()
        for seed in range(30):
            rows, cols = torch.nonzero(gen(_gen(seed)), as_tuple=True)
            assert (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)) == shape
            tops_lefts.add((int(rows.min()), int(cols.min())))
        assert len(tops_lefts) > 10  # random positions


def test_block_mask_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"num_masking_patches=200 must be in \[0, 196\]"):
        BlockMaskGenerator(num_masking_patches=200)
    with pytest.raises(ValueError, match="min_num_patches"):
        BlockMaskGenerator(min_num_patches=0)
    with pytest.raises(ValueError, match="aspect"):
        BlockMaskGenerator(min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="at least 1x1"):
        BlockMaskGenerator(0, 14)


# --------------------------------------------------------------------------------------------- tube


def _tube_span(mask: torch.Tensor) -> tuple[int, int]:
    """(start, length) of the cyclic run of masked temporal positions; asserts it is one run."""
    t = mask.shape[0]
    on = [bool(mask[i].any()) for i in range(t)]
    length = sum(on)
    if length == t:
        return 0, t
    starts = [i for i in range(t) if on[i] and not on[i - 1]]
    assert len(starts) == 1, f"masked positions {on} are not one contiguous (cyclic) run"
    return starts[0], length


def test_tube_mask_official_defaults_spans_and_wraparound() -> None:
    gen = TubeMaskGenerator()
    assert (gen.num_frames, gen.min_tube_len, gen.max_tube_len) == (8, 4, 8)
    lengths, starts, wrapped = Counter(), Counter(), 0
    for seed in range(800):
        mask = gen(_gen(seed))
        assert mask.dtype == torch.bool and mask.shape == (8, 14, 14)
        start, length = _tube_span(mask)
        assert 4 <= length <= 8
        masked = [i for i in range(8) if mask[i].any()]
        plane = mask[masked[0]]
        assert int(plane.sum()) == 98
        assert all(torch.equal(mask[i], plane) for i in masked)  # the same 2D mask on every position
        assert all(not mask[i].any() for i in range(8) if i not in masked)
        lengths[length] += 1
        if length < 8:
            starts[start] += 1
            wrapped += start + length > 8
    assert set(lengths) == {4, 5, 6, 7, 8}
    assert min(lengths.values()) > 800 / 5 * 0.6  # roughly uniform
    assert set(starts) == set(range(8))
    assert wrapped > 100  # tubes running past the end continue at position 0


def test_tube_mask_ranges_and_seeding() -> None:
    gen = TubeMaskGenerator(num_frames=8, tube_range=(0.5, 0.75))
    assert (gen.min_tube_len, gen.max_tube_len) == (4, 6)
    assert {_tube_span(gen(_gen(s)))[1] for s in range(200)} == {4, 5, 6}
    full = TubeMaskGenerator(num_frames=16, height=7, width=7, num_masking_patches=30, tube_range=(1.0, 1.0))
    for seed in range(10):
        mask = full(_gen(seed))
        assert mask.shape == (16, 7, 7) and int(mask.sum()) == 16 * 30
    single = TubeMaskGenerator(num_frames=1, tube_range=(0.0, 0.2))
    assert (single.min_tube_len, single.max_tube_len) == (1, 1)
    assert int(single(_gen(0)).sum()) == 98
    a, b = TubeMaskGenerator(seed=9), TubeMaskGenerator(seed=9)
    assert all(torch.equal(a(), b()) for _ in range(3))
    assert torch.equal(gen(_gen(4)), gen(_gen(4)))
    with pytest.raises(ValueError, match="tube_range"):
        TubeMaskGenerator(tube_range=(0.8, 0.5))
    with pytest.raises(ValueError, match="num_frames"):
        TubeMaskGenerator(num_frames=0)


def test_masks_fit_the_model_contract() -> None:
    """Video masks (B, T/2, H/16, W/16) and image masks (B, H/16, W/16) go straight into BEVTModel."""
    from bevt import BEVTConfig, BEVTModel

    config = BEVTConfig.from_preset("test")
    size, frames = config.image_size, config.num_frames
    model = BEVTModel(config).eval()
    grid = size // 16
    tube = TubeMaskGenerator(
        num_frames=frames // 2,
        height=grid,
        width=grid,
        num_masking_patches=grid * grid // 2,
        min_num_patches=2,
    )
    block = BlockMaskGenerator(grid, grid, num_masking_patches=grid * grid // 2, min_num_patches=2)
    gen = _gen(0)
    video_mask = torch.stack([tube(gen) for _ in range(2)])
    image_mask = torch.stack([block(gen) for _ in range(2)])
    assert video_mask.shape == (2, frames // 2, grid, grid) and image_mask.shape == (2, grid, grid)
    with torch.no_grad():
        video = model(torch.randn(2, frames, 3, size, size), bool_masked_pos=video_mask)
        unmasked = model(torch.randn(2, frames, 3, size, size))
        image = model(torch.randn(2, 3, size, size), bool_masked_pos=image_mask)
    assert video.pooler_output.shape == unmasked.pooler_output.shape
    assert image.pooler_output.shape[0] == 2


# --------------------------------------------------------------------------------------------- PNG helper


def test_save_mask_grid_video_and_image_masks(tmp_path: Path) -> None:
    frames = torch.full((4, 32, 48, 3), 100, dtype=torch.uint8)
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = True  # position 0 covers frames 0-1: top-left 16x16 patch
    mask[1, 1, 2] = True  # position 1 covers frames 2-3: bottom-right patch
    path = save_mask_grid(frames, mask, tmp_path / "sub" / "mask.png", columns=2, gap=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (2 * 32 + 2, 2 * 48 + 2, 3)
    tinted = np.round(100 * 0.4 + np.array([255, 0, 0]) * 0.6)
    frame0, frame2 = img[:32, :48], img[34:66, :48]
    assert (frame0[:16, :16] == tinted).all() and (frame0[16:, 16:] == 100).all()
    assert (frame2[16:, 32:] == tinted).all() and (frame2[:16, :16] == 100).all()
    assert (img[32:34] == 255).all()  # the gap between rows

    plane = torch.zeros(2, 3, dtype=torch.bool)
    plane[0, 1] = True
    out = save_mask_grid(frames.numpy()[0], plane, tmp_path / "image.png")
    single = np.asarray(Image.open(out).convert("RGB"))
    assert single.shape == (32, 48, 3)
    assert (single[:16, 16:32] == tinted).all() and (single[:16, :16] == 100).all()

    with pytest.raises(ValueError, match="cannot be split evenly"):
        save_mask_grid(frames, torch.zeros(3, 2, 3, dtype=torch.bool), tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"frames must be \(T, H, W, 3\)"):
        save_mask_grid(torch.zeros(4, 3, 32, 48), mask, tmp_path / "bad.png")


def test_mask_to_pixels_is_nearest_upsampling() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    pixels = mask_to_pixels(mask, 4, 6)
    assert pixels.shape == (4, 6) and pixels.dtype == torch.bool
    assert pixels[:2, :3].all() and not pixels[:2, 3:].any() and pixels[2:, 3:].all()
    assert mask_to_pixels(torch.zeros(3, 2, 2, 2, dtype=torch.bool), 8, 8).shape == (3, 2, 8, 8)
