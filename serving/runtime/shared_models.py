"""The loaded models of one worker, shared by the deployments that serve the same one.

Deployments serving the same registered version (an alias resolved) on the same backend and device, with the same
batch sizes and crop size (the version's own or an override), share one loaded module and one inference session:
blue and a green of the same version with other request settings, a mirror of the live version, or the next
generation of a deployment whose update changed only its request settings (ready in the time of its warm-up, not of a
load). Settings that only preprocess or post-process (resize, threshold) stay each deployment's own."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from registry.resolve import ModelBundle
from serving.runtime.predictors import Predictor


class GuidedCopy:
    """A private copy of a module for the guided methods, made on first use, one guided explanation at a time.

    They hook the module they run on: captum's hooks on every ReLU register gradient hooks on each forward pass, and
    Grad-CAM's keep the layer's activations. On the shared module they fired in every other forward pass through it
    meanwhile: another deployment's warm-up failed ("cannot register a hook on a tensor that doesn't require
    gradient"), and a concurrent explanation's gradients went through the guided ReLUs. The copy costs the weights
    once more (on the explanation device), only once a guided method is asked for."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._copy: nn.Module | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[nn.Module]:
        with self._lock:
            if self._copy is None:
                self._copy = copy.deepcopy(self._module)  # its hooks too (abandoning work checks at each forward)
            yield self._copy


@dataclass
class ModelCore:
    """What deployments of one model share: the bundle (its module explains), the predictor, the guided methods' copy
    of the module, and who uses it."""

    bundle: ModelBundle
    predictor: Predictor
    users: set[int] = field(default_factory=set)
    guided: GuidedCopy = field(init=False)

    def __post_init__(self) -> None:
        self.guided = GuidedCopy(self.bundle.module)


class SharedModels:
    """Loads each model once per worker and lets it go with its last user."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cores: dict[tuple, ModelCore] = {}
        self._loading: dict[tuple, threading.Lock] = {}  # one load per model at a time; others wait and share it

    def acquire(self, key: tuple, user: object, load: Callable[[], ModelCore],
                avoid: ModelCore | None = None) -> ModelCore:
        """The core of `key` for `user`, loaded with `load` when no one has it, or when it is `avoid`: a reload after
        failed liveness probes must not get the same stuck session back, but may share one another deployment of the
        model has already reloaded."""
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                core = self._cores.get(key)
                if core is not None and core is not avoid:
                    core.users.add(id(user))
                    return core
            core = load()
            with self._lock:
                core.users.add(id(user))
                self._cores[key] = core
            return core

    def release(self, core: ModelCore, user: object) -> bool:
        """`user` is done with `core`; True when it was the last user (the caller then lets it go)."""
        with self._lock:
            core.users.discard(id(user))
            if core.users:
                return False
            for key, current in list(self._cores.items()):
                if current is core:
                    del self._cores[key]
            return True
