"""Continuous mode: write-blocking mirrors to a replica-side daemon, points cut there (issue 9)."""
