"""Model cards (`bevt.modelcard`): Hub metadata, `model-index` results that parse back, cards without results, and
the FLOPs count."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from bevt import BEVTConfig, BEVTForVideoClassification, BEVTModel
from bevt.modelcard import EvalDataset, build_model_card, count_flops_per_view, format_flops


def _front_matter(card: ModelCard) -> dict:
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def config() -> BEVTConfig:
    names = ["moving left", "moving right", "spinning"]
    return BEVTConfig.from_preset(
        "test", num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )


def test_fine_tuning_card_carries_metadata_and_results_that_parse(config, tmp_path):
    results = {"top1_accuracy": 0.8125, "top5_accuracy": 0.96875, "mean_class_accuracy": 0.8}
    card = build_model_card(
        model_name="bevt-test-k400",
        config=config,
        pipeline_tag="video-classification",
        tags=["demo"],
        datasets=["kinetics400"],
        base_model="someone/bevt-base-pretrained",
        eval_results=results,
        eval_dataset=EvalDataset("Kinetics-400", "kinetics400", "validation"),
        num_views=(4, 3),
        flops_per_view=1_234_000_000,
        num_parameters=123_456,
        hyperparameters={"learning rate": 3e-4, "layer-wise lr decay": 0.9},
    )
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "video-classification" and meta["library_name"] == "transformers"
    assert meta["datasets"] == ["kinetics400"] and meta["base_model"] == "someone/bevt-base-pretrained"
    assert {"bevt", "video", "video-swin", "demo"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "bevt-test-k400"
    (result,) = entry["results"]
    assert result["task"]["type"] == "video-classification"
    assert result["dataset"] == {"name": "Kinetics-400", "type": "kinetics400", "split": "validation"}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == {"accuracy": 0.8125, "top_5_accuracy": 0.96875, "mean_class_accuracy": 0.8}
    assert all(m["args"] == {"num_clips": 4, "num_crops": 3} for m in result["metrics"])

    body = str(card)
    assert "4 clip(s) x 3 crop(s) = 12" in body and "8 frames of 64x64" in body
    assert "1.23 GFLOPs" in body and "0.62 G multiply-adds" in body
    assert "| Top-1 accuracy | 81.25 |" in body and "| layer-wise lr decay | 0.9 |" in body
    assert "`moving left`, `moving right`, `spinning` (3 classes)" in body

    # Saved and loaded back with huggingface_hub, the results survive as EvalResult objects.
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert sorted((r.metric_type, r.metric_value) for r in loaded.data.eval_results) == sorted(
        {"accuracy": 0.8125, "top_5_accuracy": 0.96875, "mean_class_accuracy": 0.8}.items()
    )
    assert loaded.data.model_name == "bevt-test-k400"


def test_pretraining_card_has_no_results_and_no_pipeline_tag():
    card = build_model_card(
        model_name="bevt-pretrained", config=BEVTConfig.from_preset("test"), datasets=["k400"]
    )
    meta = _front_matter(card)
    assert "model-index" not in meta and "pipeline_tag" not in meta
    assert meta["library_name"] == "transformers" and "## Evaluation" not in str(card)
    assert "run_finetuning.py --model_name_or_path bevt-pretrained" in str(card)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_results": {"top1_accuracy": 0.5}, "pipeline_tag": "video-classification"}, "eval_dataset"),
        (
            {
                "eval_results": {"top1_accuracy": 81.2},
                "pipeline_tag": "video-classification",
                "eval_dataset": EvalDataset("K", "k"),
            },
            r"fraction in \[0, 1\]",
        ),
    ],
)
def test_bad_results_raise(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model_card(model_name="m", config=config, **kwargs)


def test_flops_per_view_on_meta_equals_a_real_count_and_grows_with_frames():
    from torch.utils.flop_counter import FlopCounterMode

    model = BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=5)).eval()
    flops = count_flops_per_view(model)
    eager = BEVTForVideoClassification(copy.deepcopy(model.config)).eval()
    eager.set_attn_implementation("eager")  # real forward with explicit attention matmuls
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        eager(torch.randn(1, 8, 3, 64, 64))
    assert flops == counter.get_total_flops() > 0
    assert count_flops_per_view(model, num_frames=16) == pytest.approx(2 * flops, rel=0.05)
    assert next(model.parameters()).device.type == "cpu" and model.config._attn_implementation == "sdpa"
    # Video Swin-B at 32x224x224: the paper's 282 GFLOPs are multiply-adds, i.e. ~564 G in FlopCounterMode's units.
    base = count_flops_per_view(BEVTModel(BEVTConfig.from_preset("base")), num_frames=32, image_size=224)
    assert 275e9 < base / 2 < 290e9, format_flops(base)
