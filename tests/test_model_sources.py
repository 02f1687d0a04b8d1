"""Where a run's models, tokenizers and data come from (issue 17): cards name no absolute local paths, a fine-tuning
card takes its dataset from the shards' `dataset_info.json`, a folder whose weights mostly do not fit is refused, and
a missing local folder is "no such folder" naming the flag."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import load_script

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.modelcard import card_source


@pytest.fixture(scope="module")
def pretraining():
    return load_script("run_pretraining.py")


# ------------------------------------------------------------------------------------- cards: no local paths


def test_card_source_keeps_hub_ids_and_urls_and_names_local_folders(tmp_path):
    folder = tmp_path / "my-tokenizer"
    folder.mkdir()
    assert card_source(str(folder)) == "my-tokenizer"
    assert card_source(str(folder) + "/") == "my-tokenizer"
    assert card_source("/no/such/place/tok") == "tok"  # absolute: local even when gone
    assert card_source("/data/k400/train/*.tar") == "train/*.tar"
    assert card_source("microsoft/dall-e-tokenizer") == "microsoft/dall-e-tokenizer"
    assert card_source("hf://datasets/org/k400/train") == "hf://datasets/org/k400/train"
    assert (
        card_source("https://example.com/shards/{000..009}.tar")
        == "https://example.com/shards/{000..009}.tar"
    )


def test_pretraining_card_names_a_local_tokenizer_and_shards_by_folder_name(pretraining, tmp_path):
    tokenizer_dir = tmp_path / "secret-home" / "my-tokenizer"
    tokenizer_dir.mkdir(parents=True)
    shards = tmp_path / "secret-home" / "images"
    shards.mkdir()
    args = pretraining.parse_args(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    args.target, args.tokenizer_name_or_path, args.random_tokenizer = "tokenizer", str(tokenizer_dir), False
    args.demo, args.stage, args.image_shards = False, "image", [str(shards)]
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    results = {"first": {}, "final_window": {}, "steps": 1, "samples": {"image": 2}}
    schedule = SimpleNamespace(num_warmup_steps=0, max_train_steps=1)
    Path(args.output_dir).mkdir()
    pretraining.write_model_card(args, model, results, schedule)
    card = (Path(args.output_dir) / "README.md").read_text()
    assert str(tmp_path) not in card
    assert "visual-token ids of my-tokenizer" in card
    assert "images ['images']" in card
