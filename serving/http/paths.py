"""URL paths that middleware and the OpenAPI document tell apart without importing the routes."""

MANAGEMENT_PREFIX = "/manage"  # the management API (admin key)
