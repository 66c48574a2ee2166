"""The environment variables Lantern's server and its operator's client read: one list for both sides (the client
imports nothing else of the server)."""

PRIMARY_ENV = "LANTERN_API_KEY"  # the endpoint's scoring keys, when they come from the environment (a Secret)
SECONDARY_ENV = "LANTERN_API_KEY_SECONDARY"
ADMIN_ENV = "LANTERN_ADMIN_KEY"  # the admin key: the server's when set, and what the CLI sends
URL_ENV = "LANTERN_URL"  # the endpoint the management CLI talks to
STATE_URI_ENV = "LANTERN_STATE_URI"  # the database holding endpoint state (default: SQLite under the Lantern home)
HOST_ENV = "LANTERN_HOST_ID"  # names this host's workers in the shared state (default: hostname and a random suffix)
