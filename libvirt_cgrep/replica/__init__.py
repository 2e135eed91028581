"""Replica targets: the on-disk format, the stream protocol, the receiver and the sender."""
