"""The loaded models of one worker, shared by the deployments that serve the same one.

Deployments serving the same registered version (an alias resolved) on the same backend and device, with the same
batch sizes and crop size (the version's own or an override), share one loaded module and one inference session:
blue and a green of the same version with other request settings, a mirror of the live version, or the next
generation of a deployment whose update changed only its request settings (ready in the time of its warm-up, not of a
load). Settings that only preprocess or post-process (resize, threshold) stay each deployment's own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.resolve import ModelBundle
from serving.predictors import Predictor


@dataclass
class ModelCore:
    """What deployments of one model share: the bundle (its module explains), the predictor, the guided methods' lock
    (they hook the module), and who uses it."""

    bundle: ModelBundle
    predictor: Predictor
    guided_lock: threading.Lock = field(default_factory=threading.Lock)
    users: set[int] = field(default_factory=set)


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
