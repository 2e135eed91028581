"""The lab: a tiny guest that makes dependent writes, lab domains, and the checker.

The lab is how every consistency claim of the project is proven: the guest's
workload writes a dependent-write chain across all its disks, and the checker
(:mod:`libvirt_cgrep.lab.check`) says whether a set of images is one
consistent cut.
"""
