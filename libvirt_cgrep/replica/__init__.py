"""Replica targets (library): the on-disk format, the stream protocol and its client, the link, the sender."""
