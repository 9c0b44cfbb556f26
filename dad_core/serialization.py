"""The one way the product reads and writes weights: nothing read from a file can run code.

A ``torch.load(weights_only=False)`` unpickles arbitrary Python: a checkpoint on a shared volume or an S3 bucket
would become code execution in every pod that reads it. So:

- the product writes its own files as **safetensors** (tensors) plus **JSON** (everything else):
  :func:`save_tree` / :func:`load_tree` store any nest of dicts, lists, tuples, tensors, numbers and strings, which
  covers model, optimizer, scheduler and RNG states;
- published formats that only exist as pickles (open_clip weights, taming/latent-diffusion Lightning ``.ckpt``,
  older product files) go through :func:`load_torch_file`, which is ``torch.load(weights_only=True)``: tensors and
  plain containers only. ``placeholders=True`` (for Lightning's hyper-parameters and callbacks) loads the classes a
  file names as inert stand-ins whose code never runs;
- a file that needs more is refused with one line naming it and the command that converts it once
  (:func:`convert_pickled_file`, ``dad convert-checkpoint``): the same restricted unpickler, with numpy's values
  rebuilt by numpy and every other class the file names loaded inert, whole modules becoming their state dicts.

Nothing here runs a full unpickler.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dad_core.errors import DADError

__all__ = [
    "UnsafeFileError",
    "WeightsFileError",
    "convert_pickled_file",
    "load_torch_file",
    "load_tree",
    "read_bytes",
    "is_safetensors",
    "save_tree",
    "state_dict_mismatch",
]

_logger = logging.getLogger(__name__)

TREE_FORMAT = "dad-tree-v1"
_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


class WeightsFileError(DADError):
    """A weights file is missing, truncated or not in a format the product reads."""


class UnsafeFileError(WeightsFileError):
    """A file holds Python objects beyond tensors and plain containers; loading it could run code."""


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of a local path, ``file://`` or any fsspec URI (``s3://``, ``gs://``, ``http(s)://``)."""
    text = str(uri)
    if "://" in text:
        import fsspec

        try:
            with fsspec.open(text, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise WeightsFileError(f"{text}: not found") from None
    path = Path(text)
    if not path.is_file():
        raise WeightsFileError(f"{path}: not found")
    return path.read_bytes()


def _convert_hint(uri: str) -> str:
    stem = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "converted"
    command = f"dad convert-checkpoint {uri} --output {stem}.safetensors"
    return f"to use its weights, convert it once (nothing in it runs): {command}"


def load_torch_file(
    uri: str | Path, *, mmap: bool = False, placeholders: bool = False, map_location: Any = "cpu"
) -> Any:
    """Read a torch file with ``weights_only=True``, or a ``.safetensors`` file; never runs code from the file.

    Args:
        uri: local path, ``file://`` or fsspec URI.
        mmap: memory-map a local file instead of reading it (cache shards).
        placeholders: load the classes a published pickle names (Lightning hyper-parameters, callbacks) as inert
            stand-ins; their code never runs and their contents are dropped. Tensors still load exactly.
        map_location: as for ``torch.load``.

    Returns:
        The loaded object: a dict of tensors for safetensors, else the file's tensors and plain containers.

    Raises:
        WeightsFileError: missing, truncated or not a torch/safetensors file.
        UnsafeFileError: the file needs classes beyond tensors and plain containers.
    """
    import io

    import torch

    text = str(uri)
    local = "://" not in text or text.startswith("file://")
    path = Path(text.removeprefix("file://"))
    if local and not path.is_file():
        raise WeightsFileError(f"{text}: not found")
    data = None if local else read_bytes(text)
    head = data[:9] if data is not None else _head(path)
    if text.endswith(".safetensors") or is_safetensors(head):
        return _load_safetensors(text, data if data is not None else path.read_bytes())
    source: Any = path if local else io.BytesIO(data)
    kwargs = {"map_location": map_location, "weights_only": True, "mmap": bool(mmap and local)}
    try:
        try:
            return torch.load(source, **kwargs)
        except pickle.UnpicklingError as err:
            if not placeholders or "Unsupported global" not in str(err):
                raise UnsafeFileError(
                    f"{text}: refused, it holds Python objects that could run code ({_why(err)}); {_convert_hint(text)}"
                ) from None
        if not local:
            source.seek(0)
        return _load_with_placeholders(source, text, kwargs)
    except WeightsFileError:
        raise
    except Exception as err:  # zip, EOF and pickle errors come in many types; all mean "this file cannot be used"
        raise WeightsFileError(f"{text}: not a readable torch file ({type(err).__name__}: {_why(err)})") from None


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(9)


def _why(err: BaseException) -> str:
    """The first line of an error, without torch's long advice about ``weights_only``."""
    text = str(err).strip().splitlines()
    for line in text:
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.replace("WeightsUnpickler error:", "").strip()
    return text[0][:300] if text else type(err).__name__


class _Placeholder:
    """Stands in for a class a file names outside its weights; none of that class's code runs. It keeps what the
    pickle hands it (constructor arguments, state), which :func:`convert_pickled_file` reads a module's weights from.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _load_with_placeholders(
    source: Any, name: str, kwargs: dict[str, Any], *, real: Mapping[str, Any] | None = None
) -> Any:
    """``torch.load(**kwargs)`` (``weights_only=True``) with each class ``source`` names loaded as a placeholder,
    except those in ``real`` (full name: the object the restricted unpickler may call)."""
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    if hasattr(source, "seek"):
        source.seek(0)
    real = real or {}
    stand_ins = [full for full in names if full not in real]
    _logger.warning("%s: loading %d non-tensor classes as inert placeholders: %s", name, len(stand_ins), stand_ins[:10])
    stubs = [(type(full.rsplit(".", 1)[-1], (_Placeholder,), {}), full) for full in stand_ins]
    allowed = [(obj, full) for full, obj in real.items()]  # all: a value's type must be allowed to be built
    with torch.serialization.safe_globals([*stubs, *allowed]):
        return torch.load(source, **kwargs)


def _load_safetensors(uri: str, data: bytes | None = None) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(uri) if data is None else data
    try:
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__") or {}
        if meta.get("format") != TREE_FORMAT:
            return tensors
        return _decode(json.loads(meta["tree"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsFileError(f"{uri}: not a readable safetensors file ({type(err).__name__}: {err})") from None


# --- the product's own files: safetensors + JSON ------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, Any], path: str) -> Any:
    """A JSON-able image of ``obj``; tensors go into ``tensors`` under their tree path."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_NDARRAY: path}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, tuple | list):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS, _NDARRAY} & set(obj)):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            _ITEMS: [
                [_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"cannot store a {type(obj).__name__} at {path or 'the top'}: only tensors and plain data")


def _decode(node: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if _TENSOR in node:
        return tensors[node[_TENSOR]]
    if _NDARRAY in node:
        return tensors[node[_NDARRAY]].numpy()
    if _TUPLE in node:
        return tuple(_decode(v, tensors) for v in node[_TUPLE])
    if _ITEMS in node:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def save_tree(obj: Any, path: Path) -> Path:
    """Write ``obj`` as one safetensors file: its tensors, and the rest as JSON in the file's metadata.

    Tensors that share storage are stored as separate copies (safetensors forbids aliasing). Not atomic by itself:
    callers write into a temporary path (:func:`dad_core.io.atomic_path`) or directory.
    """
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tree = _encode(obj, tensors, "root")
    stored = {k: v.clone() if _shares_storage(v, tensors) else v for k, v in tensors.items()}
    save_file(stored, str(path), metadata={"format": TREE_FORMAT, "tree": json.dumps(tree, sort_keys=True)})
    return Path(path)


def _shares_storage(tensor: Any, tensors: Mapping[str, Any]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return ptr != 0 and sum(t.untyped_storage().data_ptr() == ptr for t in tensors.values()) > 1


def load_tree(uri: str | Path) -> Any:
    """Read what :func:`save_tree` wrote (a plain safetensors file reads as its dict of tensors).

    Raises:
        WeightsFileError: the file is missing, truncated or not safetensors.
    """
    return _load_safetensors(str(uri))


def is_safetensors(data: bytes) -> bool:
    """Whether ``data`` (at least the first 9 bytes of a file) starts like a safetensors file."""
    return len(data) >= 9 and data[8:9] == b"{"


def convert_pickled_file(source: str | Path, output: str | Path) -> Path:
    """Rewrite a torch pickle the safe loader refuses in the product's safe format (:func:`save_tree`), without
    running anything from it.

    It is read with torch's restricted unpickler (``weights_only=True``). numpy arrays, scalars and dtypes are rebuilt
    by numpy; every other class the file names is loaded as an inert placeholder. A placeholder holding a module's
    state (a whole pickled ``nn.Module``) becomes that module's state dict (parameters and persistent buffers);
    other objects that are not plain data are dropped, with a warning naming them.

    Returns:
        ``output``.

    Raises:
        WeightsFileError: ``source`` is unreadable.
        UnsafeFileError: ``source`` names what torch's restricted unpickler refuses outright (``os.system``, say).
    """
    from dad_core.io import atomic_path

    try:
        kwargs = {"map_location": "cpu", "weights_only": True}
        obj = _load_with_placeholders(str(source), str(source), kwargs, real=_numpy_globals())
    except pickle.UnpicklingError as err:  # torch refuses some names outright (os, posix, subprocess, ...)
        raise UnsafeFileError(f"{source}: refused, it names code no checkpoint needs ({_why(err)})") from None
    except Exception as err:
        raise WeightsFileError(f"{source}: not a readable torch file ({type(err).__name__}: {_why(err)})") from None
    plain = _plain(obj, "root")
    return atomic_path(Path(output), lambda tmp: save_tree(plain, tmp))


def _numpy_globals() -> dict[str, Any]:
    """What a pickle of numpy values names, by every name numpy 1 and 2 give it: numpy's own constructors, which
    rebuild arrays, scalars and dtypes from data and run nothing else."""
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):  # a file names the numpy that wrote it
        out[f"{prefix}._reconstruct"], out[f"{prefix}.scalar"] = multiarray._reconstruct, multiarray.scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype by its class
    out.update({f"numpy.dtypes.{name}": getattr(dtypes, name) for name in dir(dtypes or ()) if name.endswith("DType")})
    return out


def _module_state_dict(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The state dict of a pickled module from its ``__dict__``: parameters and persistent buffers, then its
    submodules' under ``name.``, as ``nn.Module.state_dict`` lists them."""
    skip = state.get("_non_persistent_buffers_set") or set()
    out = {f"{prefix}{k}": v.detach() for k, v in state["_parameters"].items() if v is not None}
    out.update({f"{prefix}{k}": v for k, v in state["_buffers"].items() if v is not None and k not in skip})
    for name, sub in state["_modules"].items():
        if isinstance(sub, _Placeholder) and _is_module_state(sub.state):
            out.update(_module_state_dict(sub.state, f"{prefix}{name}."))
    return out


def _is_module_state(state: Any) -> bool:
    return isinstance(state, Mapping) and all(k in state for k in ("_parameters", "_buffers", "_modules"))


def _plain(obj: Any, path: str) -> Any:
    """``obj`` with modules replaced by their state dicts and anything else that is not plain data dropped."""
    import numpy as np
    import torch

    if isinstance(obj, _Placeholder) and _is_module_state(obj.state):
        obj = _module_state_dict(obj.state)
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic | bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(_plain(v, f"{path}.{i}") for i, v in enumerate(obj))
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{path}.{k}") for k, v in obj.items()}
    _logger.warning("convert: dropping %s at %s (not tensors or plain data)", type(obj).__name__, path)
    return None


def state_dict_mismatch(err: RuntimeError) -> str:
    """One line out of ``load_state_dict``'s multi-line report: the first problem and how many more there are."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    if not lines:
        return str(err).strip().splitlines()[0] if str(err).strip() else "state dict mismatch"
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + "..."
    return first + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "")
