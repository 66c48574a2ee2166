"""Where a request goes: the deployment pinned by a header (never mirrored), else a weighted pick over the ready
deployments with live traffic, plus a mirrored copy's target by the mirror's share."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from serving.control.state import EndpointState
from serving.runtime.errors import InvalidRequest, NoRoute, NotReady
from serving.runtime.instance import DeploymentInstance
from serving.runtime.metrics import metrics

PIN_HEADERS = ("x-lantern-deployment", "azureml-model-deployment")


@dataclass(frozen=True)
class Route:
    """Where one request goes: the instance that answers it, and the instance that gets a mirrored copy."""

    instance: DeploymentInstance
    mirror: DeploymentInstance | None = None


def pick_route(endpoint: str, instances: dict[str, DeploymentInstance], state: EndpointState,
               headers: Mapping[str, str], rng: random.Random) -> Route:
    """The route of a request with `headers` over the serving `instances` and the `state`'s traffic."""
    pins = {header: headers[header].strip() for header in PIN_HEADERS if headers.get(header, "").strip()}
    if len(set(pins.values())) > 1:
        raise InvalidRequest("the pinning headers disagree: " + ", ".join(f"{h}: {v}" for h, v in pins.items()) +
                             "; send one of them", "conflicting_pins")
    pinned = next(iter(pins.values()), None)
    names = ", ".join(instances) or "none"
    if pinned:
        instance = instances.get(pinned)
        if instance is None:
            raise NoRoute(f"no deployment named {pinned!r} on endpoint {endpoint}; deployments: {names}")
        return Route(check_ready(instance))
    weights = state.live()
    if not weights:
        raise NoRoute(f"endpoint {endpoint} has no deployment with live traffic; set traffic, or pin a deployment "
                      f"with the header x-lantern-deployment (deployments: {names})")
    ready = [(name, percent) for name, percent in weights.items()
             if name in instances and instances[name].deployment.ready]
    if not ready:
        name = next(iter(weights))
        if name not in instances:
            raise NotReady(f"deployment {name} is starting; retry when /readyz answers 200")
        check_ready(instances[name])
    chosen = rng.choices([n for n, _ in ready], weights=[p for _, p in ready])[0]
    return Route(instances[chosen], mirror_target(state, instances, rng))


def mirror_target(state: EndpointState, instances: dict[str, DeploymentInstance],
                  rng: random.Random) -> DeploymentInstance | None:
    """The deployment a copy of this request goes to, drawn by the mirror's share; none when it is not ready (the
    skipped copy is counted)."""
    for name, percent in state.mirror_traffic.items():
        if percent > 0 and rng.random() * 100 < percent:
            instance = instances.get(name)
            if instance is None or not instance.deployment.ready:
                metrics().mirrored.labels(name, "", "skipped_unready").inc()
                return None
            return instance
    return None


def check_ready(instance: DeploymentInstance) -> DeploymentInstance:
    deployment = instance.deployment
    if deployment.state == "failed":
        raise NotReady(f"deployment {deployment.name} failed to load: {deployment.reason}")
    if not deployment.ready:
        why = f" ({deployment.reason})" if deployment.reason else ""
        raise NotReady(f"deployment {deployment.name} is {deployment.state}{why}; retry when /readyz answers 200")
    return instance
