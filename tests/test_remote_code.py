"""A saved model + video processor folder works where `bevt` is not installed (trust_remote_code=True)."""

import os
import subprocess
import sys
import textwrap

import torch

from bevt import BEVTConfig, BEVTForVideoClassification, BEVTVideoProcessor


def test_pipeline_from_remote_code_folder_without_bevt(tmp_path, shared_data):
    config = BEVTConfig.from_preset("test", id2label={0: "left", 1: "right", 2: "still"})
    model = BEVTForVideoClassification(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    BEVTVideoProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, num_frames=8).save_pretrained(
        folder
    )
    assert {"processing_bevt.py", "video_decoding.py", "frame_sampling.py"} <= {p.name for p in folder.iterdir()}
    video = str(shared_data / "videos" / "kinetics400_arm_wrestling.mp4")
    # reference scores with bevt installed
    from transformers import pipeline

    expected = pipeline("video-classification", model=str(folder), top_k=3)(video)

    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bevt" or name.startswith("bevt."):
                    raise ImportError("bevt is blocked in this test")
        sys.meta_path.insert(0, Block())
        from transformers import pipeline
        classifier = pipeline("video-classification", model={str(folder)!r}, trust_remote_code=True, top_k=3)
        assert type(classifier.model).__module__.startswith("transformers_modules")
        print(json.dumps(classifier({video!r})))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected):
        assert abs(g["score"] - e["score"]) < 1e-5
    assert torch.isclose(torch.tensor(sum(g["score"] for g in got)), torch.tensor(1.0), atol=1e-4)
