"""Hostile files: a malicious pickle fed to every loading entry point never runs its payload.

Each payload, when unpickled the unsafe way, creates a marker file (`os.system("touch ...")`,
`builtins.eval("open(...)")`, or a `getattr(__import__("os"), "system")` chain written opcode by opcode). Every entry
point must refuse it (or fail) without the marker appearing: `bevt.safe_loading`, `python -m bevt.convert` for every
`--format` (and for `--decoder`), `load_swin2d_into`, `from_pretrained` of folders whose weights are a pickle (`pytorch_model.bin`) for the
BEVT models, the Auto classes and the tokenizer, the training scripts' init flags, resuming from a checkpoint folder,
and pickle members inside data shards. A source scan checks the policy the tests rely on: no unsafe `torch.load`, no
`pickle.load`, no `eval`/`exec`, and `trust_remote_code` never turned on by our code.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification, BEVTModel
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.convert import FORMATS, TOKENIZER_FORMATS, convert_checkpoint, load_swin2d_into, read_checkpoint
from bevt.convert import main as convert_main
from bevt.convert_tokenizer import convert_dalle_encoder, convert_vqgan_encoder
from bevt.modeling_tokenizer import BEVTVisualTokenizer
from bevt.safe_loading import (
    DALL_E_DECODER_CLASSES,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict_file,
)

REPO = Path(__file__).resolve().parents[1]
SYSTEM = f"{os.system.__module__}.system"  # "posix.system" on Linux


from helpers import HostilePayload as Payload  # noqa: E402
from helpers import load_script  # noqa: E402


def getattr_chain(marker: Path) -> bytes:
    """Protocol-0 pickle of `getattr(__import__("os"), "system")("touch marker")`, written opcode by opcode."""
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR"
        + f"(S'touch {marker}'\ntR.".encode()
    )


LAYOUTS = ("zip", "legacy", "raw_pickle", "getattr_chain")


def write_hostile(path: Path, marker: Path, layout: str = "zip", kind: str = "os.system") -> Path:
    """A checkpoint whose unsafe unpickling runs the payload (next to real tensors, as an attacker would)."""
    content = {
        "state_dict": {"backbone.patch_embed.proj.weight": torch.zeros(2)},
        "meta": Payload(kind, marker),
    }
    if layout == "zip":
        torch.save(content, path)
    elif layout == "legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    elif layout == "raw_pickle":  # protocol 5: STACK_GLOBAL opcodes
        path.write_bytes(pickle.dumps({"payload": Payload(kind, marker)}, protocol=5))
    else:
        path.write_bytes(getattr_chain(marker))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_payloads_are_live_when_unpickled_unsafely(tmp_path: Path, marker: Path, layout: str):
    """Control: every payload below really runs under a plain unsafe load."""
    path = write_hostile(tmp_path / "hostile.pth", marker, layout)
    if layout in ("zip", "legacy"):
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------------------------------------- library


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_library_loaders_refuse_hostile_pickles(tmp_path: Path, marker: Path, layout: str, kind: str):
    path = write_hostile(tmp_path / "hostile.pth", marker, layout, kind)
    named = SYSTEM if layout != "getattr_chain" and kind == "os.system" else "builtins."
    if kind == "builtins.eval" and layout != "getattr_chain":
        named = "builtins.eval"
    calls = [
        lambda: load_checkpoint(path),
        lambda: load_checkpoint(path, allow_module_pickle=True),  # the DALL-E restricted unpickler path
        lambda: load_state_dict_file(path),
        lambda: read_checkpoint(path),
        lambda: convert_dalle_encoder(path, tmp_path / "out"),
        lambda: convert_vqgan_encoder(path, tmp_path / "out"),
        lambda: load_swin2d_into(BEVTModel(BEVTConfig.from_preset("test")), path),
        *[(lambda fmt=fmt: convert_checkpoint(fmt, path, tmp_path / "out")) for fmt in FORMATS],
    ]
    for call in calls:
        with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")) as err:
            call()
        assert "Nothing was executed" in str(err.value) or "nothing was executed" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_module_pickle_allowlist_does_not_let_a_payload_through(tmp_path: Path, marker: Path, monkeypatch):
    """A pickled `dall_e.encoder.Encoder` (an allowlisted module class) carrying a payload is refused statically:
    the inert-record unpickler is never even reached, and the real class is never imported."""
    import types

    module = types.ModuleType("dall_e.encoder")

    class Encoder(torch.nn.Module):
        pass

    Encoder.__module__, Encoder.__qualname__ = "dall_e.encoder", "Encoder"
    module.Encoder = Encoder
    monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
    monkeypatch.setitem(sys.modules, "dall_e.encoder", module)
    encoder = Encoder()
    encoder.weight = torch.nn.Parameter(torch.zeros(2))
    encoder.hidden = Payload("os.system", marker)
    torch.save(encoder, tmp_path / "encoder.pkl")
    monkeypatch.delitem(sys.modules, "dall_e.encoder")
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM.replace(".", r"\.")):
        load_checkpoint(tmp_path / "encoder.pkl", allow_module_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM.replace(".", r"\.")):
        convert_dalle_encoder(tmp_path / "encoder.pkl")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("layout", (*LAYOUTS, "decoder_module_tree"))
def test_decoder_conversion_refuses_hostile_pickles(tmp_path: Path, marker: Path, layout: str, capsys):
    """OpenAI's decoder.pkl is read like encoder.pkl: a hostile `--decoder` file is refused without running, after a
    good encoder, and nothing is written (the library call and the CLI)."""
    dall_e = pytest.importorskip("dall_e")
    encoder = tmp_path / "encoder.pkl"
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), encoder)
    hostile = tmp_path / "decoder.pkl"
    if layout == "decoder_module_tree":  # a real DALL-E decoder module with the payload hidden in its tree
        decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
        decoder.blocks.group_2.block_1.extra = Payload("os.system", marker)
        torch.save(decoder, hostile)
    else:
        write_hostile(hostile, marker, layout)
    named = "builtins." if layout == "getattr_chain" else SYSTEM
    with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")):
        convert_dalle_encoder(encoder, tmp_path / "out", decoder_path=hostile)
    with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")):
        load_checkpoint(hostile, allow_module_pickle=True, module_classes=DALL_E_DECODER_CLASSES)
    code = convert_main(["--format", "dalle-encoder", "--checkpoint", str(encoder), "--decoder", str(hostile),
                         "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and named in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_vqgan_decoder_conversion_refuses_a_hostile_decoder_file(tmp_path: Path, marker: Path):
    config = BEVTVisualTokenizerConfig(
        tokenizer_type="vqgan", vqgan_channels=8, vqgan_channel_multipliers=(1, 1), vqgan_num_res_blocks=1,
        vqgan_attention_levels=(), vqgan_z_channels=4, vqgan_embed_dim=4, vqgan_norm_groups=4, vocab_size=16,
    )
    good = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": BEVTVisualTokenizer(config).state_dict()}, good)
    hostile = write_hostile(tmp_path / "decoder.ckpt", marker, "zip")
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM.replace(".", r"\.")):
        convert_vqgan_encoder(good, tmp_path / "out", decoder_path=hostile, vqgan_norm_groups=4)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", FORMATS + TOKENIZER_FORMATS)
def test_convert_cli_refuses_hostile_checkpoints_for_every_format(
    tmp_path: Path, marker: Path, capsys, fmt: str
):
    path = write_hostile(tmp_path / "hostile.pth", marker, "zip")
    code = convert_main(["--format", fmt, "--checkpoint", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and SYSTEM in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_cli_as_a_process(tmp_path: Path, marker: Path):
    """The real `python -m bevt.convert` command line: a one-line error, exit status 1, payload never run."""
    path = write_hostile(tmp_path / "hostile.pth", marker, "legacy")
    result = subprocess.run(
        [sys.executable, "-m", "bevt.convert", "--format", "bevt-pretrain", "--checkpoint", str(path)]
        + ["--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"refusing to unpickle global(s) {SYSTEM}" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_files_in_disguise_give_clear_errors(tmp_path: Path, marker: Path, capsys):
    """A pickle named .safetensors, a truncated checkpoint: a one-line error from the CLI, nothing executed."""
    disguised = write_hostile(tmp_path / "model.safetensors", marker, "zip")
    with pytest.raises(ValueError, match="not a valid .safetensors file"):
        load_checkpoint(disguised)
    good = tmp_path / "good.pth"
    torch.save({"a": torch.ones(1000)}, good, _use_new_zipfile_serialization=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:-1500])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    for path in (disguised, truncated, tmp_path / "missing.pth"):
        code = convert_main(
            ["--format", "video-swin", "--checkpoint", str(path), "--output-dir", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- from_pretrained


def _hostile_folder(folder: Path, model: torch.nn.Module, marker: Path) -> Path:
    """A save_pretrained folder whose weights are a pickle (`pytorch_model.bin`) carrying the payload."""
    model.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    state = dict(model.state_dict())
    state["payload"] = Payload("os.system", marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def pickled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pickled_model")
    marker = root / "PAYLOAD_RAN"
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    return _hostile_folder(root / "model", model, marker), marker


@pytest.fixture(scope="module")
def pickled_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pickled_tokenizer")
    marker = root / "PAYLOAD_RAN"
    config = BEVTVisualTokenizerConfig(
        vocab_size=64, image_size=32, dalle_hidden_size=16, dalle_num_blocks_per_group=1
    )
    return _hostile_folder(root / "tokenizer", BEVTVisualTokenizer(config), marker), marker


def test_from_pretrained_refuses_pickled_weights(pickled_model_dir, pickled_tokenizer_dir):
    from transformers import (
        AutoModel,
        AutoModelForPreTraining,
        AutoModelForVideoClassification,
    )

    folder, marker = pickled_model_dir
    loaders = [
        BEVTModel,
        BEVTForMaskedVideoModeling,
        BEVTForVideoClassification,
        AutoModel,
        AutoModelForPreTraining,
        AutoModelForVideoClassification,
    ]
    for cls in loaders:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            cls.from_pretrained(folder)
    tokenizer_folder, tokenizer_marker = pickled_tokenizer_dir
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        BEVTVisualTokenizer.from_pretrained(tokenizer_folder)
    assert not marker.exists() and not tokenizer_marker.exists()


def test_remote_code_is_never_trusted_on_the_users_behalf(tmp_path: Path, marker: Path):
    """A folder whose config points at remote code that would run on import: our classes and the Auto classes
    (without the user's own trust_remote_code=True) never import it."""
    from transformers import AutoConfig, AutoModel

    evil_code = f"open({str(marker)!r}, 'w').close()\n"
    folder = tmp_path / "remote"
    BEVTModel(BEVTConfig.from_preset("test")).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(evil_code)
    assert isinstance(AutoModel.from_pretrained(folder), BEVTModel)  # bevt's registered classes, not evil.py
    assert isinstance(BEVTModel.from_pretrained(folder), BEVTModel)
    # an unknown model type that only remote code could build: refused without the user's explicit consent
    config["model_type"] = "not-bevt"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- scripts


def test_pretraining_init_flags_refuse_hostile_files(
    tmp_path: Path, marker: Path, pickled_model_dir, pickled_tokenizer_dir
):
    script = load_script("run_pretraining.py")
    hostile = write_hostile(tmp_path / "swin2d.pth", marker, "legacy")
    out = ["--output_dir", str(tmp_path / "run")]
    args = script.parse_args(["--swin2d_checkpoint", str(hostile), *out])
    with pytest.raises((UnsafeCheckpointError, SystemExit), match=SYSTEM.replace(".", r"\.")):
        script.build_model(args, None)
    folder, model_marker = pickled_model_dir
    args = script.parse_args(["--model_name_or_path", str(folder), *out])
    with pytest.raises((pickle.UnpicklingError, SystemExit)):
        script.build_model(args, None)
    tokenizer_folder, tokenizer_marker = pickled_tokenizer_dir
    args = script.parse_args(["--tokenizer_name_or_path", str(tokenizer_folder), *out])
    with pytest.raises((pickle.UnpicklingError, SystemExit)):
        script.load_tokenizer(args)
    assert not marker.exists() and not model_marker.exists() and not tokenizer_marker.exists()


def test_finetuning_init_flag_refuses_hostile_files(tmp_path: Path, pickled_model_dir):
    script = load_script("run_finetuning.py")
    folder, marker = pickled_model_dir
    args = script.parse_args(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "run")])
    with pytest.raises((pickle.UnpicklingError, SystemExit)):
        script.build_model(args, ["a", "b"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "model"]
)
def test_resume_from_a_hostile_checkpoint_folder_never_runs_its_payload(
    tmp_path: Path, marker: Path, target: str
):
    """`--resume_from_checkpoint` of both scripts: `CheckpointManager.load` -> `Accelerator.load_state`, with the
    lr scheduler registered for checkpointing as the scripts do (Accelerate loads such custom states with
    `weights_only=False`)."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from bevt.training import CheckpointManager

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    manager = CheckpointManager(tmp_path / "out")
    folder = manager.save(accelerator, 1, data_state={"position": 1})
    manager.load(accelerator, folder)  # the genuine checkpoint loads

    if target == "model":
        (folder / "model.safetensors").unlink()
        target = "pytorch_model.bin"
    write_hostile(folder / target, marker, "zip")
    try:
        manager.load(accelerator, "latest")
    except Exception:  # noqa: BLE001 - refusing is right; what matters is that nothing ran
        pass
    assert not marker.exists(), f"resuming ran code pickled in {target}"


def test_pickle_members_in_shards_are_never_unpickled(tmp_path: Path, marker: Path):
    """WebDataset decoders unpickle `.pyd`/`.pickle` members and `torch.load` `.pth` ones; our reader ignores them."""
    from test_fault_injection import encode_video

    from bevt.data.streaming import build_stream

    payload = pickle.dumps(Payload("os.system", marker))
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for name, data in (
            ("s0.mp4", encode_video(4)),
            ("s0.pyd", payload),
            ("s0.pickle", payload),
            ("s0.pth", write_hostile(tmp_path / "x.pth", marker).read_bytes()),
            ("s0.json", b'{"label": 0}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(build_stream(tmp_path / "shard-00000.tar", clip_len=2))
    assert [s["__key__"] for s in samples] == ["s0"]
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- source policy


def _our_python_files() -> list[Path]:
    files = sorted((REPO / "src" / "bevt").rglob("*.py")) + sorted(REPO.glob("run_*.py"))
    files += sorted((REPO / "benchmarks").glob("*.py"))
    return [f for f in files if f.is_file()]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_source_never_loads_unsafely_nor_trusts_remote_code_for_the_user():
    problems = []
    for path in _our_python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in (
                "pickle.load",
                "pickle.loads",
                "pickle.Unpickler",
                "dill.load",
                "dill.loads",
                "marshal.loads",
            ):
                problems.append(f"{where}: {name}")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                problems.append(f"{where}: {name}(...)")
            if name.endswith("yaml.load") or name.endswith("yaml.unsafe_load"):
                problems.append(f"{where}: {name} (use yaml.safe_load)")
            allow_pickle = keywords.get("allow_pickle")
            if isinstance(allow_pickle, ast.Constant) and allow_pickle.value is True:
                problems.append(f"{where}: allow_pickle=True")
            remote = keywords.get("trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{where}: trust_remote_code=True set by our code")
    assert not problems, "\n".join(problems)
