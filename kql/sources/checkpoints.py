"""Reading weights and pickled models safely, and fitting a state dict to an
architecture.

Every file is read with ``torch.load(weights_only=True)`` first, which can
never run code; a file that is a pickle naming Python classes is refused
unless the user said ``TRUSTED``. A state dict is fitted to the architecture
it is for: the number of classes and auxiliary heads are read from its keys,
and keys or shapes that do not fit are listed in the error.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from kql.errors import PlanError
from kql.sources.images import shape_text

__all__ = ["torch_load_safe", "torch_load_trusted", "NeedsCode", "read_state_dict", "unwrap_state_dict",
           "fit_state_dict"]


_PICKLED_CODE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def torch_load_safe(path: Union[str, os.PathLike], what: str) -> Any:
    """``torch.load(weights_only=True)`` with errors turned into PlanErrors.

    Returns the loaded object, or raises ``NeedsCode`` when the file is a
    valid pickle that references Python classes (a pickled module...).
    """
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise PlanError(f"{what} file not found: '{shown}'")
    if os.path.isdir(shown):
        raise PlanError(f"cannot read {what} '{shown}': it is a directory, not a file")
    if _is_torchscript(shown):
        raise PlanError(f"cannot read {what} '{shown}': it is a TorchScript archive (torch.jit.save); KQL "
                        f"needs an eager model: save torch.save(model.state_dict(), ...) and load it with "
                        f"ARCHITECTURE <name>")
    try:
        return torch.load(shown, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = _PICKLED_CODE.search(str(e)) or _PICKLED_CODE.search(str(e.__context__ or ""))
        if found:
            raise NeedsCode(found.group(1)) from None
        raise PlanError(f"cannot read {what} '{shown}': not a PyTorch file "
                        f"(write it with torch.save)") from None
    except PermissionError:
        raise PlanError(f"cannot read {what} '{shown}': permission denied") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError):
        # Each is what torch.load raises for some kind of non-torch file
        # (a foreign zip, an empty file, text...).
        raise PlanError(f"cannot read {what} '{shown}': not a PyTorch file "
                        f"(write it with torch.save)") from None


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a torch.jit.save archive (a zip with a ``constants.pkl`` record)."""
    import zipfile
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class NeedsCode(Exception):
    """The file is a pickle that imports ``qualname``: loading it would run code."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    shown = os.fspath(path)
    try:
        obj = torch_load_safe(path, "weights")
    except NeedsCode as e:
        raise PlanError(f"weights '{shown}' hold pickled code ({e.qualname}); loading them would run "
                        f"code from the file. Save a state dict instead "
                        f"(torch.save(model.state_dict(), ...)), or use LOAD MODEL '{shown}' AS <name> "
                        f"TRUSTED if you trust it") from None
    state = unwrap_state_dict(obj)
    if state is None:
        raise PlanError(f"weights '{shown}' hold a {type(obj).__name__}, not a state dict (save "
                        f"model.state_dict() with torch.save)")
    return state


_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """The tensor dict inside ``obj`` (a state dict or a training checkpoint), or None."""
    if not isinstance(obj, dict):
        return None
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        return None
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _classifier_key(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The weight of the final classifier: the last >=2-D weight with 1000 outputs
    (a Linear, or squeezenet's 1x1 Conv2d)."""
    found = None
    for k, v in state.items():
        if k.endswith("weight") and v.ndim >= 2 and v.shape[0] == 1000:
            found = k
    return found


def fit_state_dict(name: str, state: dict[str, torch.Tensor], path, build) -> tuple[nn.Module, int]:
    """Build ``name`` to match ``state`` (number of classes, auxiliary heads) and load it.

    ``build(num_classes, aux)`` constructs the architecture.
    """
    aux = any(k.startswith(("AuxLogits.", "aux1.", "aux2.")) for k in state)
    model = build(1000, aux)
    expected = model.state_dict()
    n = 1000
    key = _classifier_key(expected)
    if key is not None and key in state and state[key].ndim >= 1 and state[key].shape[0] != 1000:
        n = int(state[key].shape[0])
        model = build(n, aux)
        expected = model.state_dict()

    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints lack it).
    def counts(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in state and counts(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape))
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing keys " + _listing(missing))
    if unexpected:
        problems.append("unexpected keys " + _listing(unexpected))
    if shapes:
        problems.append("shape mismatch for " + _listing(
            [f"{k}: file {shape_text(a)} vs model {shape_text(b)}" for k, a, b in shapes]))
    if problems:
        raise PlanError(f"weights '{os.fspath(path)}' do not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return model, n


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def torch_load_trusted(shown: str, qualname: str) -> Any:
    try:
        return torch.load(shown, weights_only=False, map_location="cpu")
    except (ModuleNotFoundError, AttributeError, ImportError) as e:
        raise PlanError(f"cannot load '{shown}': it needs {qualname}, which cannot be imported here "
                        f"({e}); import the module that defines it first, or save a state dict and "
                        f"load it with ARCHITECTURE <name>") from None
    except Exception as e:
        raise PlanError(f"cannot load '{shown}': unpickling failed ({type(e).__name__}: {e})") from None
