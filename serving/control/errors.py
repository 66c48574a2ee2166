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


class UnknownJob(ControlError):
    """No explanation job of this endpoint has that id (or it was removed after its result expired)."""

    code = "unknown_job"


class JobExpired(ControlError):
    """The job finished longer ago than `limits.job_result_seconds`: its result is gone."""

    code = "job_expired"


class JobQueueFull(ControlError):
    """The endpoint has `limits.max_queued_jobs` jobs queued or running already."""

    code = "too_many_jobs"


class JobNotFinished(ControlError):
    """A result asked of a job that has none: still queued or running, cancelled, or failed as a whole."""

    code = "job_not_finished"


class JobFinished(ControlError):
    """A job cancelled that had already ended."""

    code = "job_finished"
