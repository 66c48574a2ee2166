"""The endpoint's control plane: the persisted state every worker follows (deployments, generations, traffic, mirror,
key digests), the keys, the workers' status board and counters, the checks a deployment passes before it is added,
and the management operations and views the management API serves."""
