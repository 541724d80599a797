"""Metrics, the live progress line and rate-limited peer logging."""
