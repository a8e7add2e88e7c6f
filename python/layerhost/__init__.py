"""Run neural-network models whose layers are plugins, on numpy arrays.

The host's own library runs the model in this process (no command line is
spawned): ``Model(path)`` reads the model file and loads each layer's
plugin; calling it runs the forward pass. The plugins shipped with the
project are in this package's ``plugins/`` folder, searched after any
``plugin_dirs=`` and ``$LAYER_PLUGIN_PATH``.

Inputs: an array that is C-contiguous, aligned and already of the element
type the model takes is lent to the host for the call, not copied; any
other is converted once (by the host's rules: floats are never truncated
to integers) into a copy. The GIL is released while the model runs, so
other Python threads go on meanwhile, including threads running models. A
lent array must not be written while the call runs: the host reads it in
place, so another thread writing it then makes that call's result
unspecified (the host never writes to an input, and the array cannot be
freed during the call, which holds a reference to it).

Outputs are new numpy arrays that own their memory. ``params()`` returns
copies, too: changing them changes nothing in the model.

Errors: every failure of the host raises ``layerhost.Error``, or one of its
subclasses ``ModelError``, ``PluginError``, ``ParamsError``, ``InputError``,
with the message the ``host`` command line prints, without its ``error: ``
prefix. A plugin that panics raises ``PluginError``; the interpreter goes
on.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import Error, InputError, ModelError, ParamsError, PluginError

__all__ = [
    "Model",
    "plugins",
    "bundled_plugin_dir",
    "Error",
    "ModelError",
    "PluginError",
    "ParamsError",
    "InputError",
]

_PACKAGE = Path(__file__).resolve().parent

PathLike = Union[str, "os.PathLike[str]"]
Shape = Sequence[int]


def bundled_plugin_dir() -> Path:
    """The folder holding the plugins shipped with the package."""
    return _PACKAGE / "plugins"


def _worker_exe() -> Optional[Path]:
    exe = _PACKAGE / "bin" / "host"
    return exe if exe.is_file() else None


def _search_dirs(plugin_dirs: Sequence[PathLike]) -> List[str]:
    """``plugin_dirs``, then ``$LAYER_PLUGIN_PATH``, then the bundled
    plugins: the command line's order, the bundled folder standing where the
    ``host`` executable's own folder stands there."""
    dirs = [os.fspath(d) for d in plugin_dirs]
    dirs += [d for d in os.environ.get("LAYER_PLUGIN_PATH", "").split(os.pathsep) if d]
    dirs.append(str(bundled_plugin_dir()))
    return dirs


# Integer types the host does not hold itself: widened to int64, which
# holds every value of each (uint64 is checked).
_WIDENED = {np.dtype(t) for t in (np.int8, np.int16, np.uint16, np.uint32, np.uint64)}


def _as_array(value: Any, path: str, name: str) -> np.ndarray:
    array = np.asarray(value)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype in _WIDENED:
        if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
            raise InputError(
                f"{path}: input '{name}': uint64 value {array.max()} does not fit in int64"
            )
        array = array.astype(np.int64)
    return array


def _shapes(model: "Model", shapes: Union[None, Shape, Mapping[str, Shape]]) -> List[Tuple[str, List[int]]]:
    if shapes is None:
        return []
    if isinstance(shapes, Mapping):
        return [(str(k), [int(d) for d in v]) for k, v in shapes.items()]
    names = model.input_names
    if len(names) != 1:
        raise InputError(
            f"{model.path}: the model takes {len(names)} inputs ({', '.join(names)}): "
            "give the shapes as a dict by input name"
        )
    return [(names[0], [int(d) for d in shapes])]


class Model:
    """A model file loaded with its plugins, ready to run.

    Keywords are the command line's: ``params=`` (a safetensors or ``.npz``
    file, instead of the model file's ``"params"``), ``plugin_dirs=``
    (searched first), ``threads=`` (threads a run may split a batch
    across; default: every core), ``seed=`` (instead of the model file's,
    for parameters no file provides), ``allow_unused_params=``,
    ``isolate=`` (run every plugin in a worker process of its own, as
    ``--isolate``) and ``timeout=`` (seconds one isolated call may take,
    as ``--timeout``).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        params: Optional[PathLike] = None,
        plugin_dirs: Sequence[PathLike] = (),
        threads: Optional[int] = None,
        seed: Optional[int] = None,
        allow_unused_params: bool = False,
        isolate: bool = False,
        timeout: Optional[float] = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: give a number of threads of at least 1")
        exe = _worker_exe()
        self._native = _native.NativeModel(
            os.fspath(path),
            None if params is None else os.fspath(params),
            _search_dirs(plugin_dirs),
            0 if threads is None else int(threads),
            seed,
            allow_unused_params,
            isolate,
            timeout,
            None if exe is None else str(exe),
        )
        self.path = str(self._native.path)
        #: For each input of the last run, the address of the memory the
        #: host read it from (the array's own when it was lent), or None
        #: when it was copied. One value per model, whichever thread ran it
        #: last: a diagnostic, e.g. to check that an input is not copied.
        self.lent_addresses: List[Optional[int]] = []

    @property
    def input_names(self) -> List[str]:
        """The model's inputs, in declared order (a chain's one: ``input``)."""
        return list(self._native.input_names)

    @property
    def output_names(self) -> List[str]:
        """The model's outputs, in order."""
        return list(self._native.output_names)

    def __repr__(self) -> str:
        return f"layerhost.Model({self.path!r})"

    def __call__(self, x: Any) -> np.ndarray:
        """Runs a model of one input and one output: array in, array out."""
        inputs, outputs = self.input_names, self.output_names
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(
                f"{self.path}: the model takes {len(inputs)} input(s) ({', '.join(inputs)}) "
                f"and gives {len(outputs)} output(s) ({', '.join(outputs)}): call "
                "run({name: array, ...}), which returns a dict"
            )
        return self._run([_as_array(x, self.path, inputs[0])])[0]

    def run(self, inputs: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """Runs the model on one array per input, by name; returns every
        output by name."""
        names = self.input_names
        unknown = [k for k in inputs if k not in names]
        if unknown:
            raise InputError(
                f"{self.path}: the model has no input '{unknown[0]}'; its inputs are: "
                f"{', '.join(names)}"
            )
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(
                f"{self.path}: the model's input(s) {', '.join(missing)} are not given; "
                f"its inputs are: {', '.join(names)}"
            )
        arrays = [_as_array(inputs[n], self.path, n) for n in names]
        return dict(zip(self.output_names, self._run(arrays)))

    def _run(self, arrays: List[np.ndarray]) -> List[np.ndarray]:
        outputs, addresses = self._native.run(arrays)
        self.lent_addresses = list(addresses)
        return outputs

    def params(self, shapes: Union[None, Shape, Mapping[str, Shape]] = None) -> Dict[str, np.ndarray]:
        """Every stored parameter by full name (``"0.weight"``), in layer
        order, as ``host params`` shows them: from the parameter file, or
        initialized from the seed. Copies: changing them changes nothing in
        the model. A model whose parameter shapes depend on its input needs
        ``shapes`` (a shape, or a dict of them by input name), as ``host
        params`` needs ``--input-shape``."""
        return dict(self._native.params(_shapes(self, shapes)))

    def inspect(self, shapes: Union[None, Shape, Mapping[str, Shape]] = None) -> Dict[str, Any]:
        """What ``host inspect --json`` prints, as a dict: layers, shapes,
        types, parameters. Without ``shapes``, what can be told by probing."""
        return json.loads(self._native.inspect(_shapes(self, shapes)))

    def row_sharding_refusal(self, shapes: Union[Shape, Mapping[str, Shape]]) -> Optional[str]:
        """Why inputs of ``shapes`` cannot be cut into blocks of rows (axis
        0) run separately, the outputs joined, with the same result as one
        run of the whole; ``None`` when they can (every layer is
        batch-independent and keeps the rows). A model with ``centered``,
        which subtracts the mean of the whole tensor, is refused."""
        return self._native.row_sharding_refusal(_shapes(self, shapes))


def plugins(plugin_dirs: Sequence[PathLike] = ()) -> List[Dict[str, str]]:
    """Every plugin found, as ``host plugins`` lists it: name, version,
    interface version, description and path. A library file that cannot
    be read is skipped with a warning, as the command line does."""
    found, problems = _native.plugins(_search_dirs(plugin_dirs))
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    return [
        {
            "name": name,
            "version": version,
            "interface": interface,
            "description": description,
            "path": str(path),
        }
        for name, version, interface, description, path in found
    ]
