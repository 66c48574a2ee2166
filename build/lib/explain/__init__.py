"""Lantern explain package."""
