"""One flag name per meaning across the three training scripts and the CLIs (issue 17): every spelling of a flag
(its name, the other scripts' or Transformers' names, underscores or dashes, in a --config file too) parses to the
same field; flags whose meanings differ say so in their help."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import load_script

from bevt.convert import _parser as convert_parser
from bevt.data.make_shards import build_parser as make_shards_parser
from bevt.training.arguments import FLAG_NAMES, BEVTArgumentParser

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def scripts():
    return {
        name: load_script(f"run_{name}.py") for name in ("pretraining", "finetuning", "tokenizer_training")
    }


def _base(name: str, tmp_path: Path) -> list[str]:
    out = ["--output_dir", str(tmp_path / name)]
    return {"pretraining": ["--image_shards", "x.tar", "--stage", "image"], "finetuning": ["--train_shards", "x.tar"],
            "tokenizer_training": ["--image_shards", "x.tar"]}[name] + out  # fmt: skip


def _value(field: str, tmp_path: Path) -> tuple[str, object]:
    """A valid command-line value of `field` and what it parses to."""
    if field == "label_names":
        path = tmp_path / "classes.txt"
        path.write_text("a\nb\nc\n")
        return str(path), str(path)
    return {"num_warmup_steps": ("3", 3),
        "checkpointing_steps": ("5", 5), "max_train_steps": ("7", 7), "num_workers": ("1", 1),
            "label_smoothing": ("0.2", 0.2), "sampling": ("uniform", "uniform"), "num_frames": ("6", 6)}[field]  # fmt: skip


def test_every_spelling_of_a_flag_parses_to_its_field(scripts, tmp_path):
    checked = set()
    for name, script in scripts.items():
        has = {f.name for f in dataclasses.fields(script.parse_args(_base(name, tmp_path)))}
        for field, names in FLAG_NAMES.items():
            if field not in has:
                continue
            text, expected = _value(field, tmp_path)
            spellings = {f"--{n}" for n in {field, *names}} | {
                f"--{n.replace('_', '-')}" for n in {field, *names}
            }
            for flag in sorted(spellings):
                assert getattr(script.parse_args([*_base(name, tmp_path), flag, text]), field) == expected, (
                    flag
                )
                assert (
                    getattr(script.parse_args([*_base(name, tmp_path), f"{flag}={text}"]), field) == expected
                )
            checked.add((name, field))
    assert {("finetuning", f) for f in FLAG_NAMES} <= checked  # fine-tuning has every one
    assert {("pretraining", "num_warmup_steps"), ("tokenizer_training", "num_frames")} <= checked


def test_aliases_work_in_config_files_and_the_preferred_name_leads_the_help(scripts, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"warmup_steps": 4, "max-steps": 9, "sampling": "uniform"}))
    args = scripts["finetuning"].parse_args(["--train_shards", "x.tar", "--config", str(config)])
    assert (args.num_warmup_steps, args.max_train_steps, args.sampling) == (4, 9, "uniform")
    from bevt.training.finetuning_arguments import FinetuningArguments

    actions = {a.dest: a for a in BEVTArgumentParser(FinetuningArguments)._actions}
    assert (
        actions["sampling"].option_strings[0] == "--sampling_mode"
    )  # the video processor's / convert's name
    assert actions["num_warmup_steps"].option_strings[0] == "--num_warmup_steps"


def test_flags_with_different_meanings_say_so(scripts, capsys):
    texts = {}
    for name, script in scripts.items():
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        texts[name] = " ".join(capsys.readouterr().out.split())
    assert "in epochs (not a fraction as the other scripts' --warmup_ratio)" in texts["finetuning"]
    for name in ("pretraining", "tokenizer_training"):
        assert "(run_finetuning.py counts it in epochs: --warmup_epochs)" in texts[name]
    assert (
        "one batch per stream; run_finetuning.py's single stream: --per_device_train_batch_size"
        in texts["pretraining"]
    )
    assert "not an EMA of the weights as run_finetuning.py's --ema_decay" in texts["tokenizer_training"]


def test_the_clis_accept_the_scripts_names(tmp_path):
    labels = tmp_path / "classes.txt"
    labels.write_text("a\nb\n")
    base = ["--root", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    for flag in ("--labels", "--label-names", "--label_names"):
        args = make_shards_parser().parse_args([*base, flag, str(labels)])
        assert args.labels == str(labels), flag
    for flag in ("--overwrite", "--overwrite-output-dir", "--overwrite_output_dir"):
        assert make_shards_parser().parse_args([*base, flag]).overwrite, flag
    base = ["--format", "bevt-pretrain", "--checkpoint", "x.pth", "--output-dir", str(tmp_path / "c")]
    for flag in ("--sampling-mode", "--sampling_mode", "--sampling"):
        assert convert_parser().parse_args([*base, flag, "uniform"]).sampling_mode == "uniform", flag
    for flag in ("--id2label", "--label-names", "--label_names"):
        assert convert_parser().parse_args([*base, flag, str(labels)]).id2label == labels, flag


def test_readme_lists_every_flag_name():
    text = README.read_text()
    section = text[text.index("### Flag names") :]
    for field, names in FLAG_NAMES.items():
        for name in {field, *names}:
            assert f"--{name}" in section, name
