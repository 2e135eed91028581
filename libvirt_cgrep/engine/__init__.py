"""The engine: backends, the point (cut) pipeline, fences and the guardian, sync cycles."""
