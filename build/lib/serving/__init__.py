"""Lantern serving package."""
