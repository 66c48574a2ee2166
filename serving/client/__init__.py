"""The operator's side, over HTTP only (no torch, no MLflow): the management client, the `lantern deploy / traffic /
keys / rollout` commands and the rollout driver."""
