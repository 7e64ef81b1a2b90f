"""Connectors: one module (or folder) per technology."""
