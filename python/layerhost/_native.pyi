"""Type stubs of the extension module (python/src/lib.rs); ``layerhost``
wraps it in the API users see."""

from os import PathLike
from typing import List, Optional, Sequence, Tuple

import numpy as np

class Error(Exception): ...
class ModelError(Error): ...
class PluginError(Error): ...
class ParamsError(Error): ...
class InputError(Error): ...

class NativeModel:
    def __init__(
        self,
        path: str,
        params: Optional[str],
        plugin_dirs: Sequence[str],
        threads: int,
        seed: Optional[int],
        allow_unused_params: bool,
        isolate: bool,
        timeout: Optional[float],
        worker_exe: Optional[str],
    ) -> None: ...
    @property
    def input_names(self) -> List[str]: ...
    @property
    def output_names(self) -> List[str]: ...
    @property
    def path(self) -> PathLike[str]: ...
    def run(
        self, inputs: Sequence[np.ndarray]
    ) -> Tuple[List[np.ndarray], List[Optional[int]]]: ...
    def inspect(self, shapes: Sequence[Tuple[str, Sequence[int]]]) -> str: ...
    def params(
        self, shapes: Sequence[Tuple[str, Sequence[int]]]
    ) -> List[Tuple[str, np.ndarray]]: ...
    def row_sharding_refusal(
        self, shapes: Sequence[Tuple[str, Sequence[int]]]
    ) -> Optional[str]: ...

def plugins(
    plugin_dirs: Sequence[str],
) -> Tuple[List[Tuple[str, str, str, str, PathLike[str]]], List[str]]: ...
