"""Lantern lantern package."""
