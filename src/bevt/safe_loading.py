"""Safe checkpoint reading: the one place where bevt reads weight files.

Nothing here executes code taken from a file:

- `.safetensors` files are read with `safetensors`.
- Every other file (`.pt`, `.pth`, `.bin`, `.ckpt`, `.pkl`, ...) is read with `torch.load(weights_only=True)`,
  PyTorch's restricted unpickler: only tensors, storages and plain containers can be rebuilt. A file that needs
  any other global is refused with an `UnsafeCheckpointError` naming the global(s).
- Pickled *modules* (OpenAI's DALL-E `encoder.pkl` / `decoder.pkl` are pickled `dall_e.encoder.Encoder` /
  `dall_e.decoder.Decoder` modules) are read only when asked (`allow_module_pickle=True`). The pickle's globals are
  first listed statically (nothing is unpickled) and must all be on a short allowlist: tensor/storage rebuild
  functions, `collections.OrderedDict`, `set`, `torch.device`, and the known module classes
  (`DALL_E_ENCODER_CLASSES` by default, `DALL_E_DECODER_CLASSES` for the decoder). The module classes are
  *not imported*: each one is replaced by an inert `PickledRecord` that only stores the pickled attributes, so
  neither `dall_e` nor `torch.nn` code runs. The parameters and persistent buffers of the record tree are then
  returned as a flat state dict, with the usual dotted `state_dict()` keys.

`load_checkpoint` returns the file's top-level mapping without unwrapping anything (`{"state_dict": ...}`
stays nested); `load_state_dict_file` additionally requires a flat `str -> Tensor` mapping.

Note: while a module pickle is being read, the record classes are registered with
`torch.serialization.safe_globals`, which is process-wide; the records are inert, so concurrent loads in other
threads can at most build inert records.
"""

import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DALL_E_DECODER_CLASSES",
    "DALL_E_ENCODER_CLASSES",
    "PickledRecord",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_state_dict_file",
    "scan_pickle_globals",
]

PathLike = str | os.PathLike

# Module classes found in `torch.save(dall_e.Encoder(...))` (and in OpenAI's encoder.pkl).
DALL_E_ENCODER_CLASSES: frozenset[str] = frozenset(
    {
        "dall_e.encoder.Encoder",
        "dall_e.encoder.EncoderBlock",
        "dall_e.utils.Conv2d",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.linear.Identity",
        "torch.nn.modules.pooling.MaxPool2d",
    }
)

# Module classes found in `torch.save(dall_e.Decoder(...))` (and in OpenAI's decoder.pkl).
DALL_E_DECODER_CLASSES: frozenset[str] = frozenset(
    {
        "dall_e.decoder.Decoder",
        "dall_e.decoder.DecoderBlock",
        "dall_e.utils.Conv2d",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.linear.Identity",
        "torch.nn.modules.upsampling.Upsample",
    }
)

_STORAGE_TYPES = (
    "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble",
)
# Globals a module pickle may use besides its module classes: tensor/parameter rebuilding and plain containers.
_MODULE_PICKLE_BASE_GLOBALS: frozenset[str] = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.device",
        "torch.Size",
        "collections.OrderedDict",
        "builtins.set",
        *(f"torch.{name}Storage" for name in _STORAGE_TYPES),
    }
)
_MAX_MODULE_DEPTH = 64
_PICKLES_IN_LEGACY_FILE = 5  # magic number, protocol, sys info, object, storage keys


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs a global (class or function) that bevt refuses to unpickle. Nothing was executed."""


class PickledRecord:
    """Inert stand-in for an allowlisted class of a module pickle.

    Instances only hold what the pickle stored: constructor arguments in `args` and the unpickled state, as
    attributes when it is a dict (for an `nn.Module`: `_parameters`, `_buffers`, `_modules`, plain attributes such
    as `n_hid`), else in `state`.
    `pickled_global` names the class it stands for.
    """

    pickled_global: str = ""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # e.g. a tuple state: kept as is
            self.state = state

    def __repr__(self) -> str:
        return f"PickledRecord({self.pickled_global})"


def load_checkpoint(
    path: PathLike,
    *,
    allow_module_pickle: bool = False,
    module_classes: Iterable[str] = DALL_E_ENCODER_CLASSES,
) -> dict[str, Any]:
    """Read a checkpoint file safely onto the CPU and return its top-level mapping.

    Args:
        path: a `.safetensors` file, or a `torch.save`/pickle file (zip or legacy format).
        allow_module_pickle: also accept a pickled `nn.Module` whose classes are all in `module_classes`; it is
            returned as its flat state dict (parameters and persistent buffers, `state_dict()` keys).
        module_classes: fully qualified global names that may appear in a module pickle, each replaced by an
            inert `PickledRecord` (default: the DALL-E encoder's module classes).

    Returns:
        The mapping stored in the file, nothing unwrapped (e.g. `{"state_dict": {...}, "meta": {...}}`).

    Raises:
        UnsafeCheckpointError: the file needs a global outside the allowlist (named in the message), or it cannot
            be parsed as a pickle at all (so it cannot be checked); nothing ran.
        ValueError: the file is corrupt or truncated, or its top-level object is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except SafetensorError as error:
            raise ValueError(f"{path}: not a valid .safetensors file ({error})") from None

    module_classes = frozenset(module_classes)
    found = scan_pickle_globals(path)
    module_globals = found & module_classes
    if module_globals:
        refused = found - module_classes - _MODULE_PICKLE_BASE_GLOBALS
        if refused:
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle global(s) {_names(refused)}; a module pickle may only use tensor "
                f"rebuild functions, plain containers and the allowlisted module classes. Nothing was executed."
            )
        if not allow_module_pickle:
            raise UnsafeCheckpointError(
                f"{path} is a pickled module (it needs {_names(module_globals)}); refusing to unpickle it. "
                "Read it with allow_module_pickle=True (or convert it with `python -m bevt.convert_tokenizer`)."
            )
        records = [(_record_class(name), name) for name in sorted(module_globals)]
        with torch.serialization.safe_globals(records):
            obj = _torch_load(path, found)
    else:
        obj = _torch_load(path, found)

    if isinstance(obj, PickledRecord):
        return _module_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a mapping (e.g. a state dict) at the top level, got {type(obj).__name__}")
    return dict(obj)


def load_state_dict_file(
    path: PathLike,
    *,
    allow_module_pickle: bool = False,
    module_classes: Iterable[str] = DALL_E_ENCODER_CLASSES,
) -> dict[str, torch.Tensor]:
    """Like `load_checkpoint`, but the file must hold a flat `str -> Tensor` state dict.

    Raises:
        ValueError: some value is not a tensor (e.g. the weights are nested under `"state_dict"`); the message
            names the key.
    """
    checkpoint = load_checkpoint(path, allow_module_pickle=allow_module_pickle, module_classes=module_classes)
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: expected a flat state dict of tensors, but key {key!r} holds a {type(value).__name__} "
                f"(top-level keys: {sorted(map(str, checkpoint))[:10]})"
            )
    return checkpoint


def scan_pickle_globals(path: PathLike) -> set[str]:
    """List the globals (`module.name`) a `torch.save`/pickle file refers to, without unpickling anything.

    Reads `data.pkl` of a zip checkpoint, or the leading pickles of a legacy/raw pickle file, opcode by opcode
    (`pickletools.genops`). `__builtin__` (protocol 2) is reported as `builtins`.
    """
    path = Path(path)
    try:
        return _scan_file(path)
    except (UnsafeCheckpointError, zipfile.BadZipFile) as error:
        if str(error).startswith(str(path)):
            raise
        raise UnsafeCheckpointError(
            f"{path}: cannot be read as a torch.save/pickle checkpoint (corrupt, truncated, or another format), so "
            f"it is not loaded; nothing was executed ({error})"
        ) from None


def _scan_file(path: Path) -> set[str]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise ValueError(f"{path}: zip file without data.pkl is not a torch.save checkpoint")
            if any(n.endswith("constants.pkl") for n in archive.namelist()):
                raise ValueError(f"{path}: TorchScript archives are not supported; save a state dict instead")
            return _globals_in_pickles(io.BytesIO(archive.read(names[0])), max_pickles=1)
    with open(path, "rb") as stream:
        return _globals_in_pickles(stream, max_pickles=_PICKLES_IN_LEGACY_FILE)


def _globals_in_pickles(stream: io.BufferedIOBase, max_pickles: int) -> set[str]:
    found: set[str] = set()
    for index in range(max_pickles):
        start = stream.tell()
        try:
            found |= _globals_in_one_pickle(stream)
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # not (or no longer) a pickle: legacy files end with raw storage bytes
            if index == 0:
                raise UnsafeCheckpointError(f"cannot read the pickle at offset {start}: {error}") from error
            break
    return found


def _globals_in_one_pickle(stream: io.BufferedIOBase) -> set[str]:
    found: set[str] = set()
    strings: list[str | None] = []  # string operands pushed so far, for STACK_GLOBAL (protocol >= 4)
    memo: dict[int, str | None] = {}
    previous: str | None = None  # the string the last pushing opcode pushed (None: not a string)
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        pushed: str | None = None
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add(_qualified(module, attr))
        elif name == "STACK_GLOBAL":
            module, attr = (strings[-2:] if len(strings) >= 2 else [None, None])
            if module is None or attr is None:
                raise UnsafeCheckpointError("pickle builds a global name dynamically; refusing it")
            found.add(_qualified(module, attr))
        elif "UNICODE" in name or name.endswith("STRING"):
            pushed = arg if isinstance(arg, str) else None
            strings.append(pushed)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(int(arg))
            strings.append(pushed)
        elif name == "MEMOIZE":
            memo[len(memo)] = previous
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = previous
        if name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            previous = pushed
    return found


def _qualified(module: str, attr: str) -> str:
    module = "builtins" if module == "__builtin__" else module
    return f"{module}.{attr}"


def _names(globals_: Iterable[str]) -> str:
    return ", ".join(sorted(globals_))


def _record_class(qualified_name: str) -> type[PickledRecord]:
    cls_name = qualified_name.rsplit(".", 1)[-1]
    return type(cls_name, (PickledRecord,), {"pickled_global": qualified_name, "__module__": __name__})


def _torch_load(path: Path, found: set[str]) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:  # a storage or the zip is cut / damaged
        raise ValueError(
            f"{path}: cannot read this checkpoint, it is corrupt or truncated ({type(error).__name__}: "
            f"{str(error).strip() or 'unexpected end of file'})"
        ) from None
    except pickle.UnpicklingError as error:
        message = str(error)
        # torch names the first refused global (and drops the `builtins.` prefix): match it with the static scan.
        named = re.findall(r"GLOBAL (\S+)", message)
        culprits = {next((g for g in found if g == n or g.endswith("." + n)), n) for n in named}
        culprits = culprits or found - _MODULE_PICKLE_BASE_GLOBALS  # e.g. refused STACK_GLOBAL: use the scan
        reason = next((line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line
                       or "Can only" in line or "unrecognized" in line), "")
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle global(s) {_names(culprits) or '(see below)'}; only tensors and plain "
            f"containers are read (torch.load weights_only=True). Nothing was executed. {reason}".rstrip()
        ) from error


def _module_state_dict(root: PickledRecord) -> dict[str, torch.Tensor]:
    """Flatten a record tree of pickled `nn.Module`s into `state_dict()`-style `name -> tensor`."""
    state: dict[str, torch.Tensor] = {}

    def visit(node: Any, prefix: str, depth: int) -> None:
        if not isinstance(node, PickledRecord):
            raise ValueError(f"module pickle: {prefix or 'root'} is a {type(node).__name__}, not a module")
        if depth > _MAX_MODULE_DEPTH:
            raise ValueError(f"module pickle nests deeper than {_MAX_MODULE_DEPTH} modules")
        attrs = vars(node)
        if "_parameters" not in attrs or "_modules" not in attrs:
            raise ValueError(f"module pickle: {node.pickled_global} at {prefix or 'root'} has no nn.Module state")
        non_persistent = attrs.get("_non_persistent_buffers_set") or set()
        tensors = list(attrs["_parameters"].items())
        tensors += [(k, v) for k, v in (attrs.get("_buffers") or {}).items() if k not in non_persistent]
        for key, value in tensors:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"module pickle: {prefix}{key} is a {type(value).__name__}, not a tensor")
            state[prefix + key] = value.detach()
        for key, child in attrs["_modules"].items():
            if child is not None:
                visit(child, f"{prefix}{key}.", depth + 1)

    visit(root, "", 0)
    return state
