"""`pipeline("video-classification")` on a real Kinetics video with a converted 400-class model, and saved folders
that load (model, video processor, pipeline) with `trust_remote_code=True` in a Python that cannot import `bevt`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from bevt import BEVTConfig, BEVTForVideoClassification, BEVTVideoProcessor
from bevt.convert import convert_checkpoint
from bevt.data.demo_finetuning import demo_samples


@pytest.fixture(scope="module")
def kinetics_model(tmp_path_factory, shared_data):
    """torchvision `swin3d_t` (random weights, 400 classes) converted with the Kinetics-400 class names."""
    from torchvision.models.video import swin3d_t

    folder = tmp_path_factory.mktemp("k400")
    torch.manual_seed(0)
    save_file(swin3d_t(num_classes=400).state_dict(), folder / "swin3d_t.safetensors")
    labels = shared_data / "kinetics400_labels.txt"
    convert_checkpoint(
        "torchvision-swin3d", folder / "swin3d_t.safetensors", folder / "model", id2label=labels, num_frames=8
    )
    return folder / "model"


def test_pipeline_on_a_real_video_returns_top5_kinetics_labels(kinetics_model, shared_data):
    pytest.importorskip("av")  # the video-classification pipeline requires PyAV
    from transformers import AutoVideoProcessor, pipeline

    names = (shared_data / "kinetics400_labels.txt").read_text().splitlines()
    video = str(shared_data / "videos" / "kinetics400_arm_wrestling.mp4")
    classifier = pipeline("video-classification", model=str(kinetics_model))
    predictions = classifier(video)

    assert len(predictions) == 5
    assert all(p["label"] in names for p in predictions) and len({p["label"] for p in predictions}) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6

    # Same answer as running the processor and the model by hand.
    model = BEVTForVideoClassification.from_pretrained(kinetics_model).eval()
    inputs = AutoVideoProcessor.from_pretrained(kinetics_model)(video, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 8, 3, 224, 224)
    with torch.no_grad():
        probs = model(**inputs).logits.softmax(-1)[0]
    top = probs.topk(5)
    assert [model.config.id2label[i] for i in top.indices.tolist()] == [p["label"] for p in predictions]
    torch.testing.assert_close(torch.tensor(scores), top.values, atol=1e-5, rtol=1e-4)



def test_pipeline_averages_the_views_of_a_multi_view_processor(kinetics_model, shared_data, tmp_path):
    """A folder whose saved processor has 4 clips x 3 crops: the pipeline scores the average of the 12 views (the
    multi-view evaluation's softmax average), not view 0."""
    pytest.importorskip("av")
    from transformers import pipeline

    folder = tmp_path / "multi"
    shutil.copytree(kinetics_model, folder)
    processor = BEVTVideoProcessor(
        num_frames=8,
        frame_interval=4,
        num_clips=4,
        num_crops=3,
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    processor.save_pretrained(folder)
    video = str(shared_data / "videos" / "kinetics400_arm_wrestling.mp4")
    classifier = pipeline("video-classification", model=str(folder))
    predictions = classifier(video, top_k=5)

    model = classifier.model  # the same weights, by hand: every view, then the mean of their softmax scores
    assert classifier.video_processor.num_views == 12
    pixel_values = processor(video, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (12, 8, 3, 32, 32)
    with torch.no_grad():
        view_probs = model(pixel_values=pixel_values).logits.softmax(-1)  # (12, 400)
    averaged = view_probs.mean(0)
    top = averaged.topk(5)
    assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in top.indices.tolist()]
    scores = torch.tensor([p["score"] for p in predictions])
    torch.testing.assert_close(scores, top.values, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(view_probs[0], averaged, atol=1e-4)  # view 0 alone scores differently


_ISOLATED = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockBevt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bevt" or name.startswith("bevt."):
                raise ImportError(f"{name} is blocked in this test: the folder must work without the package")
            return None

    sys.meta_path.insert(0, BlockBevt())
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]

    import torch
    from transformers import AutoConfig, AutoModelForVideoClassification

    folder, inputs_path, out_path, video_path = sys.argv[1:5]
    model = AutoModelForVideoClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert "bevt" not in sys.modules, "bevt was imported"
    pixel_values = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    from transformers import pipeline

    classifier = pipeline("video-classification", model=folder, trust_remote_code=True)
    predictions = classifier(video_path, top_k=3)
    assert "bevt" not in sys.modules, "bevt was imported"
    json.dump(
        {
            "logits": logits.tolist(),
            "class": type(model).__name__,
            "module": type(model).__module__,
            "processor_module": type(classifier.video_processor).__module__,
            "id2label": {str(k): v for k, v in config.id2label.items()},
            "predictions": predictions,
        },
        open(out_path, "w"),
    )
    """
)


def test_saved_folder_works_with_trust_remote_code_without_bevt(tmp_path):
    names = ["left to right", "right to left", "up"]
    config = BEVTConfig.from_preset(
        "test", num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    torch.manual_seed(0)
    model = BEVTForVideoClassification(config).eval()
    model.save_pretrained(tmp_path / "saved")
    processor = BEVTVideoProcessor(
        num_frames=8, frame_interval=2, size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForVideoClassification"] == "modeling_bevt.BEVTForVideoClassification"
    assert {"modeling_bevt.py", "configuration_bevt.py", "processing_bevt.py"} <= {
        p.name for p in (tmp_path / "saved").iterdir()
    }
    video = tmp_path / "clip.mp4"
    video.write_bytes(next(demo_samples(1, seed=0, split="x", size=64))[2])
    with torch.no_grad():
        expected_probs = model(**processor(str(video), return_tensors="pt")).logits.softmax(-1)[0]

    folder = tmp_path / "copied"  # a copy elsewhere, as a Hub download would be
    shutil.copytree(tmp_path / "saved", folder)
    pixel_values = torch.randn(2, 8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.save(pixel_values, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits

    script = tmp_path / "isolated.py"
    script.write_text(_ISOLATED)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(folder),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.json"),
            str(video),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["class"] == "BEVTForVideoClassification"
    assert out["module"].startswith("transformers_modules"), out["module"]  # the folder's own code
    assert out["id2label"] == {"0": "left to right", "1": "right to left", "2": "up"}
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, atol=1e-5, rtol=1e-5)
    # the pipeline, with the folder's own video-processor code, gives the same top-3 as bevt in this process
    assert out["processor_module"].startswith("transformers_modules"), out["processor_module"]
    top = expected_probs.topk(3)
    assert [p["label"] for p in out["predictions"]] == [names[i] for i in top.indices.tolist()]
    scores = torch.tensor([p["score"] for p in out["predictions"]])
    torch.testing.assert_close(scores, top.values, atol=1e-5, rtol=1e-4)
