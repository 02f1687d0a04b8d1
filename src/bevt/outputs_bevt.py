"""What the BEVT models return: the output dataclasses (shapes documented), and the losses, metrics and multi-view
scores `modeling_bevt` computes from its heads' outputs. Copied next to `modeling_bevt.py` into saved folders (remote
code): it imports only torch and transformers."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import ModelOutput


@dataclass
class BEVTModelOutput(ModelOutput):
    """Output of `BEVTModel`.

    Args:
        last_hidden_state: (B, L, C_last) stage-4 tokens after the final LayerNorm, L = D*H4*W4 (video, (t, h, w)
            order) or H4*W4 (image).
        pooler_output: (B, C_last) mean of `last_hidden_state` over all positions.
        hidden_states: on request, the patch embeddings and each stage's output before patch merging, (B, L_i, C_i).
        reshaped_hidden_states: the same, channels-first: (B, C_i, D, H_i, W_i) for videos, (B, C_i, H_i, W_i) for
            images.
        attentions: on request (`output_attentions=True`), one tensor per block (sum(depths) in all, stage by
            stage): the softmax attention probabilities (B*nW_i, heads_i, N_i, N_i), nW_i windows of N_i tokens
            (N = Wd*Wh*Ww = 392 for 8x7x7 video windows, Wh*Ww = 49 for images; smaller where the grid is),
            windows in (batch, window) order. Eager attention computes them (see `BEVTAttention.attend`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BEVTMaskedVideoModelingOutput(ModelOutput):
    """Output of `BEVTForMaskedVideoModeling`.

    Args:
        loss: `video_loss_weight * video_loss + image_loss_weight * image_loss` (streams that are present).
        video_loss / image_loss: over the masked positions of each stream: cross-entropy (`target_type`
            "tokenizer") or mean squared error per value ("hog" / "pixel").
        video_mask_accuracy / image_mask_accuracy: token ids only: fraction of masked positions whose id is predicted.
        video_mask_r2 / image_mask_r2: regression targets only: coefficient of determination over the masked
            positions, `1 - sum((pred - target)^2) / sum((target - mean)^2)` with the per-value mean of the batch's
            masked targets (1 = perfect, 0 = predicting that mean, < 0 worse).
        logits: (B, T*h*w, D) for every video position in (t, h, w) order, D = vocab_size (token logits) or
            target_dim (regressed values); computed when no labels are given or when `return_logits=True` (with labels
            only the masked positions go through the output projection).
        image_logits: (B, h*w, D), same rule.
        masked_logits / image_masked_logits: (num_masked, D), the outputs the losses were computed on.
        attentions / image_attentions: on request, every block's attention probabilities for each stream (see
            `BEVTModelOutput.attentions`).
    """

    loss: torch.FloatTensor | None = None
    video_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    video_mask_accuracy: torch.FloatTensor | None = None
    image_mask_accuracy: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    masked_logits: torch.FloatTensor | None = None
    image_masked_logits: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    video_mask_r2: torch.FloatTensor | None = None
    image_mask_r2: torch.FloatTensor | None = None


def masked_r2(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """R^2 of (N, D) predictions of (N, D) targets: 1 - SSE / SST, SST around the per-column mean of `target`."""
    target = target.float()
    residual = (prediction.float() - target).square().sum()
    total = (target - target.mean(dim=0, keepdim=True)).square().sum()
    return 1.0 - residual / total.clamp_min(torch.finfo(torch.float32).tiny)


def masked_prediction_loss(
    masked_logits: torch.Tensor, target: torch.Tensor, regression: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and quality of the masked positions of one stream: `masked_logits` (N, D) against token ids (N,)
    (cross-entropy, masked-token accuracy) or, for `regression`, float targets (N, D) (mean squared error per value,
    `masked_r2`). With nothing masked (N = 0): a zero loss that keeps the graph, and a NaN quality."""
    if not target.shape[0]:
        return masked_logits.sum() * 0.0, torch.full((), float("nan"), device=masked_logits.device)
    if regression:
        return F.mse_loss(masked_logits.float(), target.float()), masked_r2(masked_logits.detach(), target)
    loss = F.cross_entropy(masked_logits.float(), target)
    return loss, (masked_logits.argmax(-1) == target).float().mean().detach()


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str | None
) -> torch.Tensor:
    """Transformers' rules for `config.problem_type`, decided per call (the config is never written, so one batch of
    class ids does not turn later soft targets into a different loss): num_labels == 1 -> MSE; integer labels ->
    cross-entropy; float (B, num_labels) -> cross-entropy against class distributions, or BCE-with-logits for
    problem_type "multi_label_classification". logits (B, num_labels) -> scalar loss."""
    problem = problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.is_floating_point():
            problem = "soft_labels"
        else:
            problem = "single_label_classification"
    logits = logits.float()
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float().squeeze(-1))
        return F.mse_loss(logits, labels.float())
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    if labels.is_floating_point():  # soft targets (mixup/cutmix, label smoothing)
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))


def average_views(logits: torch.Tensor, views: int, problem_type: str | None) -> torch.Tensor:
    """Per-view logits `(B * V, num_labels)` -> per-video `(B, num_labels)`: the log of the mean softmax over the V
    views of each video (so `softmax` of the result is the multi-view score), or the mean logits for regression /
    multi-label models."""
    if views == 1:
        return logits
    grouped = logits.float().view(-1, views, logits.shape[-1])
    if problem_type in ("regression", "multi_label_classification"):
        return grouped.mean(1).to(logits.dtype)
    return (torch.logsumexp(grouped.log_softmax(-1), dim=1) - math.log(views)).to(logits.dtype)
