"""Where a run's models, tokenizers and data come from (issue 17): cards name no absolute local paths, a fine-tuning
card takes its dataset from the shards' `dataset_info.json`, a folder whose weights mostly do not fit is refused, and
a missing local folder is "no such folder" naming the flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from test_shards import encode_jpeg

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification, BEVTVisualTokenizer
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.data.make_shards import main as make_shards_main
from bevt.finetuning import dataset_name_from_shards
from bevt.modelcard import card_source
from bevt.training.arguments import UsageError, load_error, missing_folder_reason


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> SimpleNamespace:
    """Tiny folders of each kind, and the same folders with weights that do not fit (another model's tensors under
    the right config.json): the 'most weights newly initialised' case."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test")).save_pretrained(root / "pretrained")
    BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=3)).save_pretrained(
        root / "classifier"
    )
    config = BEVTVisualTokenizerConfig(dalle_hidden_size=16, dalle_num_blocks_per_group=1, vocab_size=64)
    BEVTVisualTokenizer(config).save_pretrained(root / "tokenizer")
    for name in ("pretrained", "classifier", "tokenizer"):
        shutil.copytree(root / name, root / f"wrong-{name}")
        save_file({"encoder.foo.weight": torch.zeros(4)}, root / f"wrong-{name}" / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
    return SimpleNamespace(**{p.name.replace("-", "_"): p for p in root.iterdir()})


def _image_args() -> list[str]:
    return ["--image_shards", "x.tar", "--stage", "image"]


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


# ------------------------------------------------------------------------- weights that mostly do not fit: refused


def test_a_folder_of_the_right_type_whose_weights_do_not_fit_is_refused(
    pretraining, finetuning, folders, monkeypatch
):
    args = pretraining.parse_args([*_image_args(), "--model_name_or_path", str(folders.wrong_pretrained)])
    with pytest.raises(UsageError, match=r"--model_name_or_path .*wrong-pretrained: most of its weights do not fit a "
                       r"BEVTForMaskedVideoModeling: \d+ of the \d+ weight tensors would be newly initialised"):  # fmt: skip
        pretraining.build_model(args, None, "hog")
    args = finetuning.parse_args(
        ["--train_shards", "x.tar", "--model_name_or_path", str(folders.wrong_pretrained)]
    )
    with pytest.raises(UsageError, match=r"--model_name_or_path .*wrong-pretrained: most of its weights do not fit a "
                       r"BEVT backbone: .*embeddings\."):  # fmt: skip
        finetuning.build_model(args, ["a", "b", "c"])
    args = finetuning.parse_args(["--do_eval_only", "--model_name_or_path", str(folders.wrong_classifier),
                                  "--validation_shards", str(folders.pretrained)])  # fmt: skip
    args.validation_shards = None  # (the weights are checked before the shards are read)
    monkeypatch.setattr(finetuning, "check_shards_exist", lambda *a, **k: None)
    with pytest.raises(
        UsageError, match=r"--model_name_or_path .*wrong-classifier: most of its weights do not fit"
    ):
        finetuning.evaluate_only(args, None)
    args = pretraining.parse_args([*_image_args(), "--tokenizer_name_or_path", str(folders.wrong_tokenizer)])
    with pytest.raises(UsageError, match=r"--tokenizer_name_or_path .*wrong-tokenizer: most of its weights do not "
                       r"fit a BEVTVisualTokenizer"):  # fmt: skip
        pretraining.load_tokenizer(args)


def test_folders_whose_weights_fit_load_with_what_the_task_adds(pretraining, finetuning, folders):
    PartialState()  # (the scripts log with Accelerate's logger)
    args = pretraining.parse_args([*_image_args(), "--model_name_or_path", str(folders.classifier)])
    model = pretraining.build_model(
        args, None, "tokenizer"
    )  # a classifier folder: the prediction head is new
    source = BEVTForVideoClassification.from_pretrained(folders.classifier)
    torch.testing.assert_close(model.bevt.embeddings.mask_token, source.bevt.embeddings.mask_token)
    args = finetuning.parse_args(["--train_shards", "x.tar", "--model_name_or_path", str(folders.pretrained)])
    model = finetuning.build_model(args, ["a", "b", "c", "d"])  # a new 4-class classifier
    assert model.config.num_labels == 4
    args = pretraining.parse_args(
        [*_image_args(), "--tokenizer_name_or_path", str(folders.tokenizer), "--tokenizer_size", "64",
         "--image_size", "128"]
    )  # fmt: skip
    assert pretraining.load_tokenizer(args).config.vocab_size == 64


# ------------------------------------------------------------------------- missing local folders: "no such folder"


def test_a_missing_local_folder_is_no_such_folder_naming_the_flag(
    pretraining, finetuning, tokenizer_training, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for missing in ("outputs/x", "outputs/x/", "./x", "nothere/"):
        with pytest.raises(UsageError, match=f"--model_name_or_path {missing}: no such folder"):
            finetuning.parse_args(["--train_shards", "x.tar", "--model_name_or_path", missing])
        with pytest.raises(UsageError, match=f"--model_name_or_path {missing}: no such folder"):
            pretraining.parse_args([*_image_args(), "--model_name_or_path", missing])
        with pytest.raises(UsageError, match=f"--tokenizer_name_or_path {missing}: no such folder"):
            pretraining.parse_args([*_image_args(), "--tokenizer_name_or_path", missing])
        with pytest.raises(UsageError, match=f"--tokenizer_name_or_path {missing}: no such folder"):
            tokenizer_training.parse_args(["--tokenizer_name_or_path", missing])
    # a name that may be a Hub id is looked up there only when the Hub is online
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        UsageError, match=r"--model_name_or_path org/model: no such folder \(.*HF_HUB_OFFLINE"
    ):
        finetuning.parse_args(["--train_shards", "x.tar", "--model_name_or_path", "org/model"])
    # online: Transformers looks it up; a failed lookup still says "no such folder" first
    error = load_error(
        "--model_name_or_path", "org/model", OSError("We couldn't connect to 'https://huggingface.co'")
    )
    assert str(error) == (
        "error: --model_name_or_path org/model: no such folder, and the Hub lookup failed: We couldn't connect to "
        "'https://huggingface.co'"
    )
    assert missing_folder_reason("org/model") == "and not in the Hub cache: HF_HUB_OFFLINE is set"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert missing_folder_reason("org/model") is None  # (may be a Hub id: left to from_pretrained)


# ------------------------------------------------------------------------- the card's dataset from dataset_info.json


def test_fine_tuning_card_dataset_comes_from_the_shards_dataset_info(finetuning, tmp_path, capsys):
    root = tmp_path / "media"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.jpg").write_bytes(encode_jpeg(32, 24, seed=i + 3 * len(cls)))
    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    assert (
        make_shards_main(["--root", str(root), "--output-dir", str(named), "--dataset_name", "my-org/pets"])
        == 0
    )
    assert make_shards_main(["--root", str(root), "--output-dir", str(unnamed)]) == 0
    assert json.loads((named / "dataset_info.json").read_text())["dataset_name"] == "my-org/pets"
    assert "dataset_name" not in json.loads((unnamed / "dataset_info.json").read_text())

    assert dataset_name_from_shards([str(named), None]) == "my-org/pets"
    assert dataset_name_from_shards([str(unnamed)]) is None
    assert dataset_name_from_shards([str(named), str(unnamed)]) == "my-org/pets"

    args = finetuning.parse_args(["--train_shards", str(named), "--validation_shards", str(named)])
    assert args.dataset_name is None
    finetuning.data_shards(args, None)
    assert args.dataset_name == "my-org/pets" and args.card_eval_dataset().type == "my-org/pets"
    args = finetuning.parse_args(["--train_shards", str(unnamed)])
    finetuning.data_shards(args, None)
    assert args.dataset_name is None  # nothing recorded: nothing claimed
    args = finetuning.parse_args(["--train_shards", str(named), "--dataset_name", "kinetics400"])
    finetuning.data_shards(args, None)
    assert args.dataset_name == "kinetics400"  # the flag wins
