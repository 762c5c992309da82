"""Thin click commands over the library; no logic lives here."""
