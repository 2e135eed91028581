"""Replica-side servers: the receiver of a stream, its continuous-mode session, the lean local entry point."""
