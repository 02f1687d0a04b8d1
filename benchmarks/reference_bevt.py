"""A straightforward reference implementation of the BEVT forward pass, for benchmarks.

It computes the same math as `bevt.modeling_bevt` with the parameters of a `BEVTForMaskedVideoModeling` /
`BEVTModel`, written the way the original code is: unfused matmul-softmax attention, the relative position bias
gathered and the shifted-window mask built on every call, contiguous copies around every permute, linear layers through `F.linear`, and the
vocabulary projection over every position before the masked ones are selected. It is our own code (not the
original), used as the baseline that our model is timed against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bevt.modeling_bevt import BEVTForMaskedVideoModeling, BEVTModel, BEVTStage


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer the plain way (`F.linear`, MKL's sgemm on CPU), whatever the module's own forward does."""
    return F.linear(x, module.weight, module.bias)


def _merge(merging, x: torch.Tensor) -> torch.Tensor:
    """Patch merging: concat the 2x2 neighbours, LayerNorm, linear reduction."""
    h, w = x.shape[-3], x.shape[-2]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat(
        [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1
    )
    return _linear(merging.reduction, merging.norm(x))


def _partition(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    if x.ndim == 5:
        b, d, h, w, c = x.shape
        x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
        return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, window[0] * window[1] * window[2], c)
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window[0] * window[1], c)


def _reverse(windows: torch.Tensor, window: tuple[int, ...], b: int, grid: tuple[int, ...]) -> torch.Tensor:
    if len(grid) == 3:
        d, h, w = grid
        x = windows.view(b, d // window[0], h // window[1], w // window[2], *window, -1)
        return x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(b, d, h, w, -1)
    h, w = grid
    x = windows.view(b, h // window[0], w // window[1], *window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _build_mask(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device
) -> torch.Tensor:
    img = torch.zeros((1, *grid, 1), device=device)
    count = 0
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    if len(grid) == 3:
        for d in slices[0]:
            for h in slices[1]:
                for w in slices[2]:
                    img[:, d, h, w, :] = count
                    count += 1
    else:
        for h in slices[0]:
            for w in slices[1]:
                img[:, h, w, :] = count
                count += 1
    windows = _partition(img, window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _attention(attn_module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    b_, n, c = x.shape
    heads = attn_module.num_heads
    qkv = _linear(attn_module.qkv, x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn_module.scaling
    attn = q @ k.transpose(-2, -1)
    index = attn_module.relative_position_index[:n, :n].reshape(-1)
    bias = attn_module.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous()
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return _linear(attn_module.proj, x)


def _block(block, x: torch.Tensor, window, shift, mask) -> torch.Tensor:
    grid = tuple(x.shape[1:-1])
    b = x.shape[0]
    shortcut = x
    y = block.layernorm_before(x)
    pad = []
    for g, w in zip(reversed(grid), reversed(window)):
        pad += [0, (w - g % w) % w]
    y = F.pad(y, [0, 0, *pad])
    padded = tuple(y.shape[1:-1])
    dims = tuple(range(1, len(grid) + 1))
    if any(shift):
        y = torch.roll(y, shifts=tuple(-s for s in shift), dims=dims)
    y = _attention(block.attention, _partition(y, window), mask)
    y = _reverse(y.view(-1, *window, y.shape[-1]), window, b, padded)
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=dims)
    y = y[(slice(None), *[slice(0, g) for g in grid])].contiguous()
    x = shortcut + y
    mlp = block.mlp
    return x + _linear(mlp.fc2, mlp.act(_linear(mlp.fc1, block.layernorm_after(x))))


def _stage(stage: BEVTStage, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grid = tuple(x.shape[1:-1])
    window, shift, every = stage._windows(grid)
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    mask = _build_mask(padded, window, shift, x.device) if any(shift) else None
    for i, block in enumerate(stage.blocks):
        shifted = i % 2 == 1
        x = _block(
            block, x, window, shift if shifted else (0,) * len(grid), mask if (shifted or every) else None
        )
    merged = _merge(stage.downsample, x) if stage.downsample is not None else x
    return x, merged


def reference_encode(model: BEVTModel, pixel_values: torch.Tensor, mask: torch.Tensor | None):
    """Stage outputs (channels-last, before merging) computed the reference way."""
    if pixel_values.ndim == 5:
        pixel_values = pixel_values.transpose(1, 2)
    emb = model.embeddings.patch_embeddings(pixel_values)
    if mask is not None:
        m = F.interpolate(mask[:, None].float(), size=emb.shape[1:-1], mode="nearest")[:, 0, ..., None]
        emb = emb * (1 - m) + model.embeddings.mask_token * m
    x = emb
    outputs = []
    for stage in model.encoder.layers:
        before, x = _stage(stage, x.contiguous())
        outputs.append(before.contiguous())
    return outputs


def reference_pretraining_loss(
    model: BEVTForMaskedVideoModeling,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    labels: torch.Tensor,
    image_pixel_values: torch.Tensor,
    image_bool_masked_pos: torch.Tensor,
    image_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, video logits over every position, image logits over every position), the original way."""
    head = model.head
    norm = model.bevt.layernorm
    s = reference_encode(model.bevt, pixel_values, bool_masked_pos)
    x4 = head.video_spatial_upsample(s[3].permute(0, 4, 1, 2, 3).contiguous()).permute(0, 2, 3, 4, 1)
    x = _linear(head.video_fuse, torch.cat([s[2], x4], -1)).permute(0, 4, 1, 2, 3).contiguous()
    x = norm(head.video_temporal_upsample(x).permute(0, 2, 3, 4, 1).contiguous())
    video_logits = _linear(head.lm_head, x.flatten(1, 3))
    s = reference_encode(model.bevt, image_pixel_values, image_bool_masked_pos)
    x4 = head.image_upsample(s[3].permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
    x = norm(_linear(head.image_fuse, torch.cat([s[2], x4], -1)))
    image_logits = _linear(head.lm_head, x.flatten(1, 2))
    video_mask = bool_masked_pos.repeat_interleave(2, 1).flatten(1)
    image_mask = image_bool_masked_pos.flatten(1)
    loss = F.cross_entropy(video_logits[video_mask], labels.flatten(1)[video_mask]) + F.cross_entropy(
        image_logits[image_mask], image_labels.flatten(1)[image_mask]
    )
    return loss, video_logits, image_logits
