"""A package (not a plain folder), so that the server its conftest.py starts stops after its last test."""
