"""Workflows over whole detectors: convert, import, run, sweep."""
