"""Lantern registry package."""
