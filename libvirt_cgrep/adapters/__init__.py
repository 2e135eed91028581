"""Thin adapters at the edges: processes, qemu-img, libvirt, the filesystem.

Each adapter turns its library's or tool's failures into the project's error
tree (libvirt_cgrep.errors), keeping the cause, and returns frozen dataclasses
or plain values, never raw library objects the core would have to know.
"""
