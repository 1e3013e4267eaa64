"""namedarraytuple: a namedtuple of arrays that indexes, assigns and converts like one array.

    Samples = namedarraytuple("Samples", ["observation", "action", "reward"])
    batch = Samples(observation=np.zeros((T, B, 4)), action=np.zeros((T, B)), reward=None)
    batch[3]            # Samples(observation=[B, 4], action=[B], reward=None)
    batch[:, 0] = 1.0   # broadcast into every non-None field
    batch[t] = step     # field-by-field copy from a Samples (or any structure with the same fields)

Fields may be numpy arrays, torch tensors, namedarraytuples (nested structures recurse) or None (skipped everywhere).
Instances pickle (also under `spawn`) when the class is bound to a module-level name equal to its type name; those of
classes made at run time by `runtime_namedarraytuple` pickle with their field names, so any process can load them.
"""

from __future__ import annotations

import sys
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def namedarraytuple(typename: str, field_names: Sequence[str] | str) -> type:
    """Return a namedtuple class whose indexing and item assignment apply to every non-None field."""
    base = namedtuple(typename, field_names)

    def __getitem__(self, loc):
        fields = []
        for name, field in zip(self._fields, self):
            try:
                fields.append(None if field is None else field[loc])
            except IndexError as error:
                raise IndexError(f"namedarraytuple {typename}: field {name!r}: {error}") from error
        return type(self)(*fields)

    def __setitem__(self, loc, value):
        if not (isinstance(value, tuple) and getattr(value, "_fields", None) == self._fields):
            value = tuple(None if field is None else value for field in self)
        for name, field, field_value in zip(self._fields, self, value):
            if field is None:
                continue
            try:
                field[loc] = field_value
            except (ValueError, IndexError, TypeError, RuntimeError) as error:
                raise type(error)(f"namedarraytuple {typename}: field {name!r}: {error}") from error

    cls = type(typename, (base,), {"__getitem__": __getitem__, "__setitem__": __setitem__, "__slots__": (),
                                   "__doc__": f"namedarraytuple {typename}({', '.join(base._fields)})"})
    # Pickle looks the class up as module.typename: point it at the module that defined it.
    try:
        module = sys._getframe(1).f_globals.get("__name__", "__main__")
    except (AttributeError, ValueError):
        module = "__main__"
    cls.__module__ = base.__module__ = module
    base.__qualname__ = base.__name__ = f"{typename}_base"
    return cls


_RUNTIME_TYPES: dict[tuple[str, tuple[str, ...]], type] = {}


def runtime_namedarraytuple(typename: str, field_names: Sequence[str]) -> type:
    """The namedarraytuple class for (typename, field_names), made once per process and cached; its
    instances pickle by structure (type name, field names, values), not by a module-level name."""
    key = (typename, tuple(field_names))
    if key not in _RUNTIME_TYPES:
        cls = namedarraytuple(typename, key[1])
        cls.__reduce__ = lambda self: (_rebuild_runtime, (typename, self._fields, tuple(self)))
        _RUNTIME_TYPES[key] = cls
    return _RUNTIME_TYPES[key]


def _rebuild_runtime(typename: str, field_names: tuple[str, ...], values: tuple) -> Any:
    return runtime_namedarraytuple(typename, field_names)(*values)


def buffer_map(fn: Callable[[Any], Any], buffer: Any) -> Any:
    """Apply `fn` to every leaf (array / tensor / scalar) of a (nested) namedtuple; None stays None."""
    if buffer is None:
        return None
    if isinstance(buffer, tuple) and hasattr(buffer, "_fields"):
        return type(buffer)(*[buffer_map(fn, field) for field in buffer])
    if isinstance(buffer, tuple | list):
        return type(buffer)([buffer_map(fn, field) for field in buffer])
    return fn(buffer)


def buffer_map_named(fn: Callable[[str, Any], Any], buffer: Any, name: str) -> Any:
    """Like `buffer_map`, calling `fn(path, leaf)`: `name` is the path of `buffer` itself (of a plain leaf, its
    only path), and a field's path is its parent's path + `/` + its name."""
    if isinstance(buffer, tuple) and hasattr(buffer, "_fields"):
        return type(buffer)(*(None if field is None else buffer_map_named(fn, field, f"{name}/{field_name}")
                              for field_name, field in zip(buffer._fields, buffer)))
    return fn(name, buffer)


def buffer_leaves(buffer: Any) -> list[Any]:
    """The leaves of a (nested) namedtuple in field order, None fields left out; a plain leaf is a list of one."""
    if buffer is None:
        return []
    if isinstance(buffer, tuple | list):
        return [leaf for field in buffer for leaf in buffer_leaves(field)]
    return [buffer]


def buffer_from_example(example: Any, leading_dims: Sequence[int] | int, share_memory: bool = False) -> Any:
    """Zero-filled buffer shaped `leading_dims + leaf.shape` for every leaf of `example`, same dtypes and kind
    (numpy or torch). With `share_memory=True` every leaf is a torch tensor in shared memory, which pickles by
    reference to child processes (also under `spawn`); take numpy views there with `numpify_buffer`."""
    leading_dims = (leading_dims,) if isinstance(leading_dims, int) else tuple(leading_dims)

    def allocate(leaf):
        if isinstance(leaf, torch.Tensor):
            shape = leading_dims + tuple(leaf.shape)
            if leaf.device.type == "cpu" and not share_memory and leaf.dtype != torch.bfloat16:
                # numpy's zeros come from the OS untouched: a large buffer costs memory only as it fills.
                return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=leaf.dtype).numpy().dtype))
            tensor = torch.zeros(shape, dtype=leaf.dtype, device=leaf.device)
            return tensor.share_memory_() if share_memory else tensor
        array = np.asarray(leaf)
        if share_memory:
            dtype = torch.from_numpy(np.zeros(1, dtype=array.dtype)).dtype
            return torch.zeros(leading_dims + array.shape, dtype=dtype).share_memory_()
        return np.zeros(leading_dims + array.shape, dtype=array.dtype)

    return buffer_map(allocate, example)


def torchify_buffer(buffer: Any) -> Any:
    """numpy leaves → torch tensors sharing their memory (zero copy); tensors pass through."""
    return buffer_map(torch.as_tensor, buffer)


def numpify_buffer(buffer: Any) -> Any:
    """torch leaves (on CPU) → numpy arrays sharing their memory (zero copy); arrays pass through."""
    return buffer_map(_numpy, buffer)


def _numpy(leaf: Any) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return leaf
    if leaf.is_cpu and not leaf.requires_grad:
        return leaf.numpy()  # the common case in one call: a view of the tensor's memory
    return leaf.detach().cpu().numpy()


def buffer_to(buffer: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> Any:
    """Move every tensor leaf to `device` (numpy leaves are converted to tensors first)."""
    if device is None:
        return buffer
    return buffer_map(lambda leaf: torch.as_tensor(leaf).to(device, non_blocking=non_blocking), buffer)
