"""A package (not a plain folder), so that the servers its conftest.py starts for its tests (package-scoped
fixtures) stop after its last test rather than at the end of the session, where they idled meanwhile."""
