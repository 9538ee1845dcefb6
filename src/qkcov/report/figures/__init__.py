"""Figures drawn from saved artifacts (never from live models)."""
