"""The web dashboard (not built yet)."""
