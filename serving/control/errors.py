"""Why a management operation was refused, free of HTTP: each carries the machine-readable `code` users see and a
message saying what to do; `serving.http.errors` maps each class to its status code, in one table."""

from __future__ import annotations

from registry.errors import LanternError
from serving.faults import Fault


class ControlError(Fault):
    """A change (or a view) of the endpoint that cannot be made; `code` says why."""

    code = "control_error"


class UnknownDeployment(ControlError):
    """The change names a deployment the endpoint does not have."""

    code = "unknown_deployment"


class InvalidDeployment(ControlError):
    """The deployment given is not valid: a field out of range, a model that does not resolve, a rename."""

    code = "invalid_request"


class ChangeConflict(ControlError):
    """The change contradicts the endpoint's state: a deployment that exists, that has traffic, that is not ready, or
    a concurrent change that kept winning."""

    code = "conflict"


class StateMissing(ControlError):
    """The persisted state is gone (removed under a running server)."""

    code = "not_ready"


class StateUnavailable(ControlError, LanternError):
    """The state database does not answer: serving goes on with the last state applied; changes wait for it (a
    LanternError too: the command line reports it as a user's problem, without a traceback)."""

    code = "state_unavailable"
