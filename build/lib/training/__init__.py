"""Lantern training package."""
