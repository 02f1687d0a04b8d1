"""No silent wrong results in the training scripts (issue 17, the scripts' items): a model card that claims a dataset
the run never saw, folders of the wrong kind loaded with new random weights, label ids that disagree between the
splits and the class names, and misuse that used to fail late or with a misleading message. Each one is now refused
before training with one `error:` line naming the flag (`UsageError`, exit status 2), or handled. In process and
small: no training run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from accelerate import PartialState
from test_shards import encode_jpeg

from bevt import BEVTConfig, BEVTForVideoClassification, BEVTVisualTokenizer
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.data.shards import write_shards
from bevt.training.arguments import UsageError
from bevt.training.checkpoints import CheckpointManager


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> SimpleNamespace:
    """A tiny classifier folder and a tiny visual-tokenizer folder (the 'wrong folder' of each flag)."""
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=3)).save_pretrained(
        root / "classifier"
    )
    BEVTVisualTokenizer(
        BEVTVisualTokenizerConfig(dalle_hidden_size=16, dalle_num_blocks_per_group=1, vocab_size=64)
    ).save_pretrained(root / "tokenizer")
    return SimpleNamespace(classifier=root / "classifier", tokenizer=root / "tokenizer")


def _image_args() -> list[str]:
    return ["--image_shards", "x.tar", "--stage", "image"]


# ------------------------------------------------------------------------------------------------ item 1: model cards


def test_card_claims_no_dataset_unless_given_and_has_no_local_paths(
    finetuning, finetuning_demo_data, tiny_pretrained_folder, tmp_path
):
    data = finetuning_demo_data
    base = ["--train_shards", str(data / "train"), "--validation_shards", str(data / "validation"),
            "--model_name_or_path", str(tiny_pretrained_folder)]  # fmt: skip
    schedule = SimpleNamespace(num_warmup_steps=0, max_train_steps=1)
    torch.manual_seed(0)
    model = BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=4)).eval()
    metrics = {"top1_accuracy": 0.5, "top5_accuracy": 1.0, "mean_class_accuracy": 0.5}

    def cards(*flags: str) -> list[tuple[dict, str]]:
        found = []
        for recipe in ("k400", "ssv2"):
            out = tmp_path / f"{recipe}{len(flags)}"
            args = finetuning.parse_args([*base, "--recipe", recipe, *flags, "--output_dir", str(out)])
            exporter = finetuning.Exporter(args, ["a", "b", "c", "d"], (1, 1))
            exporter.hyperparameters = args.card_hyperparameters(schedule, 1)
            exporter.export(model, metrics, None)
            text = (out / "README.md").read_text()
            found.append((yaml.safe_load(text.split("---\n")[1]), text))
        return found

    for meta, text in cards():
        assert "datasets" not in meta and "model-index" not in meta, meta  # the run does not know its dataset
        for claim in ("kinetics", "Kinetics", "something-something", "Something-Something"):
            assert claim not in text, claim
        assert (
            "Results on the run's validation shards (no --dataset_name given)" in text and "| 50.00 |" in text
        )
        assert str(tmp_path) not in text and str(tiny_pretrained_folder) not in text  # no local paths
        assert f"a local folder `{tiny_pretrained_folder.name}`" in text

    for meta, text in cards("--dataset_name", "kinetics400"):  # given: claimed, the results indexed under it
        assert meta["datasets"] == ["kinetics400"]
        assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "kinetics400"
        assert "Results on Kinetics-400 (validation)" in text


# ------------------------------------------------------------------------------------------------ item 2: wrong folders


def test_folders_of_the_wrong_kind_are_refused(pretraining, finetuning, folders, caplog):
    with pytest.raises(UsageError, match=r"--model_name_or_path .*tokenizer: a folder of model_type "
                       r"'bevt_visual_tokenizer', expected a BEVT model folder \(model_type 'bevt'\)"):  # fmt: skip
        pretraining.parse_args([*_image_args(), "--model_name_or_path", str(folders.tokenizer)])
    with pytest.raises(UsageError, match="model_type 'bevt_visual_tokenizer', expected a BEVT model folder"):
        finetuning.parse_args(["--train_shards", "x.tar", "--model_name_or_path", str(folders.tokenizer)])

    with pytest.raises(ValueError, match=r"holds a model of type 'bevt', not a BEVT visual tokenizer"):
        BEVTVisualTokenizer.from_pretrained(folders.classifier)
    args = pretraining.parse_args([*_image_args(), "--tokenizer_name_or_path", str(folders.classifier)])
    with pytest.raises(
        UsageError, match=r"--tokenizer_name_or_path .*classifier: .*every weight newly initialised"
    ):
        pretraining.load_tokenizer(args)
    assert (
        BEVTVisualTokenizer.from_pretrained(folders.tokenizer).config.vocab_size == 64
    )  # the right folder loads


# ------------------------------------------------------------------------------------------------ item 3: label ids


def _split(folder: Path, names: list[str], labels: list[str], **meta) -> Path:
    samples = [
        (
            f"{folder.name}{i}",
            "jpg",
            encode_jpeg(32, 24, seed=i),
            {"label": labels.index(n), "label_name": n, **meta},
        )
        for i, n in enumerate(names)
    ]
    write_shards(samples, folder, kind="image", labels=labels)
    return folder


def test_label_ids_are_checked_before_training(finetuning, tmp_path):
    PartialState()
    # make_shards without --labels: each split numbers its own classes (gamma = 2 in train, 1 in validation)
    train = _split(tmp_path / "train", ["alpha", "beta", "gamma"], ["alpha", "beta", "gamma"])
    val = _split(tmp_path / "val", ["alpha", "gamma"], ["alpha", "gamma"])
    args = finetuning.parse_args(["--train_shards", str(train), "--validation_shards", str(val)])
    shards = finetuning.data_shards(args, None)
    with pytest.raises(UsageError, match=r"--train_shards / --validation_shards and the class names disagree: "
                       r"class 'gamma' is label 1 in .*val.*dataset_info\.json but label 2 in"):  # fmt: skip
        finetuning.resolve_label_names(args, shards)

    # ids beyond --label_names (samples with ids only, no names): refused before the model sees them
    ids_only = tmp_path / "ids_only"
    write_shards(
        [(f"s{i}", "jpg", encode_jpeg(seed=i), {"label": i}) for i in range(4)], ids_only, kind="image"
    )
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    args = finetuning.parse_args(["--train_shards", str(ids_only), "--label_names", str(two)])
    with pytest.raises(UsageError, match=r"label 2 of sample 's2' of .*is outside the 2 label names"):
        finetuning.resolve_label_names(args, finetuning.data_shards(args, None))

    # the same classes everywhere: accepted, in the label file's order
    names = tmp_path / "names.txt"
    names.write_text("alpha\nbeta\ngamma\n")
    val2 = _split(tmp_path / "val2", ["alpha", "gamma"], ["alpha", "beta", "gamma"])
    args = finetuning.parse_args(["--train_shards", str(train), "--validation_shards", str(val2),
                                  "--label_names", str(names)])  # fmt: skip
    assert finetuning.resolve_label_names(args, finetuning.data_shards(args, None)) == [
        "alpha",
        "beta",
        "gamma",
    ]


# ------------------------------------------------------------------------------------------------ clear and early errors


def test_missing_shards_and_folders_are_named(finetuning, pretraining, tmp_path):
    args = finetuning.parse_args(["--train_shards", "/nonexistent"])
    with pytest.raises(UsageError, match=r"^error: --train_shards: shard file not found: /nonexistent$"):
        finetuning.data_shards(args, None)  # (it used to blame --label_names)
    args = finetuning.parse_args(
        ["--train_shards", str(tmp_path), "--validation_shards", str(tmp_path / "v/*.tar")]
    )
    with pytest.raises(UsageError, match=r"--train_shards: no \.tar shards in folder"):
        finetuning.data_shards(args, None)
    for script, argv in ((finetuning, ["--train_shards", "x.tar"]), (pretraining, _image_args())):
        for missing in ("/nonexistent", "./outputs/missing", str(tmp_path / "a" / "b")):
            with pytest.raises(UsageError, match=f"--model_name_or_path {missing}: no such folder"):
                script.parse_args([*argv, "--model_name_or_path", missing])  # (not "Repo id must be ...")


def test_eval_only_on_a_pretraining_folder_names_the_model(finetuning, tiny_pretrained_folder, folders):
    with pytest.raises(UsageError, match=r"--model_name_or_path must be a video classifier .*--do_eval_only: .* is a "
                       r"BEVTForMaskedVideoModeling without a classifier \(fine-tune it first\)"):  # fmt: skip
        finetuning.parse_args(["--do_eval_only", "--model_name_or_path", str(tiny_pretrained_folder),
                               "--validation_shards", "v.tar"])  # fmt: skip
    args = finetuning.parse_args(
        ["--do_eval_only", "--model_name_or_path", str(folders.classifier), "--validation_shards", "v.tar"]
    )
    assert args.do_eval_only


def test_resume_from_a_model_folder_is_not_called_an_interrupted_save(tmp_path, folders):
    manager = CheckpointManager(tmp_path / "run")
    with pytest.raises(ValueError, match=r"is a saved model \(config\.json\), not a training checkpoint "
                       r"\(no trainer_state\.json\); pass a checkpoint-<step> folder"):  # fmt: skip
        manager.resolve(folders.classifier)
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "checkpoint_complete.json").write_text("{}")
    (run / "config.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"pass its checkpoints: checkpoint-4 \(or 'latest' with --output_dir"
    ):
        manager.resolve(run)
    (
        run / "checkpoint-6"
    ).mkdir()  # a checkpoint folder without its marker: still the interrupted-save message
    with pytest.raises(ValueError, match="interrupted while saving"):
        manager.resolve(run / "checkpoint-6")


def test_report_to_and_push_to_hub_are_checked_before_training(finetuning, pretraining, monkeypatch):
    for script, argv in ((finetuning, ["--train_shards", "x.tar"]), (pretraining, _image_args())):
        with pytest.raises(
            UsageError, match=r"--report_to must be one of all, aim, tensorboard, wandb.*got 'nonsense'"
        ):
            script.parse_args([*argv, "--with_tracking", "--report_to", "nonsense"])
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(UsageError, match=r"--push_to_hub must be used online \(HF_HUB_OFFLINE is set"):
            script.parse_args([*argv, "--push_to_hub", "--hub_token", "hf_x"])
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        with pytest.raises(UsageError, match=r"--push_to_hub must be given a Hub token: log in"):
            script.parse_args([*argv, "--push_to_hub"])
        assert script.parse_args([*argv, "--push_to_hub", "--hub_token", "hf_x"]).push_to_hub


def test_bad_sample_threshold_is_a_flag_that_reaches_the_streams(finetuning, pretraining, tmp_path, caplog):
    for script, argv in ((finetuning, ["--train_shards", "x.tar"]), (pretraining, _image_args())):
        assert script.parse_args(argv).stream_options()["max_failure_fraction"] == 0.1
        assert (
            script.parse_args([*argv, "--max_bad_sample_fraction", "0.5"]).stream_options()[
                "max_failure_fraction"
            ]
            == 0.5
        )
        with pytest.raises(UsageError, match=r"--max_bad_sample_fraction must be in \[0, 1\], got 2\.0"):
            script.parse_args([*argv, "--max_bad_sample_fraction", "2"])
    # the training stream stops past the flag's fraction: 1 bad sample in 2 (checked from the first sample here)
    from bevt.data.streaming import DataQualityError, build_stream

    samples = [
        ("ok", "jpg", encode_jpeg(), {"label": 0}),
        ("bad", "jpg", b"\xff\xd8 not a jpeg", {"label": 0}),
    ]
    write_shards(samples, tmp_path / "s", kind="image")
    options = finetuning.parse_args(
        ["--train_shards", "x.tar", "--max_bad_sample_fraction", "0.2"]
    ).stream_options()
    stream = build_stream(tmp_path / "s", kind="image", shuffle_buffer=0, min_samples_for_check=1, **options)
    with caplog.at_level(logging.WARNING), pytest.raises(DataQualityError, match=r"> 20%"):
        list(stream)
    options["max_failure_fraction"] = 0.5
    stream = build_stream(tmp_path / "s", kind="image", shuffle_buffer=0, min_samples_for_check=1, **options)
    assert [s["__key__"] for s in stream] == ["ok"]


def test_training_args_json_keeps_the_new_flags(finetuning, tmp_path):
    """training_args.json (a valid --config) carries the new flag, and a config without it still parses."""
    from bevt.training.arguments import save_training_args

    args = finetuning.parse_args(["--train_shards", "x.tar", "--max_bad_sample_fraction", "0.3"])
    saved = json.loads(save_training_args(args, tmp_path).read_text())
    assert saved["max_bad_sample_fraction"] == 0.3 and saved["dataset_name"] is None


def test_min_mask_patches_beyond_the_masked_count_is_capped_as_documented():
    """README: the smallest block is capped at the number of masked patches (one block of all of them)."""
    from bevt.pretraining import build_mask_generators

    tube, block = build_mask_generators(64, 8, mask_ratio=0.5, min_mask_patches=10_000)  # 4x4 grid: 8 masked
    assert block.min_num_patches == block.num_masking_patches == 8 and tube.block.min_num_patches == 8
    generator = torch.Generator().manual_seed(0)
    assert int(block(generator).sum()) == 8 and int(tube(generator).sum(dim=(1, 2)).max()) == 8


def test_resumed_batch_size_change_names_the_flag():
    """A resumed run with another --video_batch_size is refused by name, before the data position is restored (it
    used to fail there with "state saved with batch_size=2, loader has 3")."""
    from bevt.training.arguments import check_resumed_arguments

    saved = {"video_batch_size": 2, "image_batch_size": 16, "logging_steps": 10, "color_jitter": 0.4}
    with pytest.raises(
        UsageError, match=r"--resume_from_checkpoint ck: .* --video_batch_size 2 -> 3 \(saved"
    ):
        check_resumed_arguments(saved, {**saved, "video_batch_size": 3}, "ck")
    assert check_resumed_arguments(saved, {**saved, "logging_steps": 1}, "ck") == []
    assert check_resumed_arguments(saved, {**saved, "color_jitter": 0.2}, "ck") == [
        "--color_jitter 0.4 -> 0.2"
    ]


def test_cli_flags_take_the_training_scripts_underscore_spelling(tmp_path, capsys):
    """`python -m bevt.data.make_shards` / `bevt.convert` take `--output_dir` as well as `--output-dir` (the training
    scripts take both spellings too, through HfArgumentParser): one flag, one meaning, either spelling."""
    from bevt.convert import _parser as convert_parser
    from bevt.data.make_shards import main

    parser = convert_parser()
    required = ["--format", "video-swin", "--checkpoint", "c.pth"]
    dashed = parser.parse_args(
        [*required, "--output-dir", "o", "--window-size", "2", "7", "7", "--num-frames", "8"]
    )
    for spelling in (
        ["--output_dir", "o", "--window_size", "2", "7", "7", "--num_frames", "8"],
        ["--output_dir=o", "--window_size", "2", "7", "7", "--num_frames=8"],
        ["--out", "o", "--window-size", "2", "7", "7", "--num-f", "8"],  # unique prefixes still work
    ):
        assert vars(parser.parse_args([*required, *spelling])) == vars(dashed), spelling
    assert "--output_dir" not in parser.format_help()  # one name in --help
    root = tmp_path / "media" / "cat"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(encode_jpeg(seed=i))
    out = tmp_path / "out"
    argv = ["--root", str(tmp_path / "media"), "--output_dir", str(out), "--num_shards", "2", "--no_shuffle"]
    assert main(argv) == 0, capsys.readouterr().err
    info = json.loads((out / "dataset_info.json").read_text())
    assert [s["num_samples"] for s in info["shards"]] == [2, 1]
