"""The libnvdimm model of a region file: namespaces, their labels and their claims.

No nbdkit and no CLI in here: the control socket (control/) and the offline CLI (bttctl/)
drive it, and the data path (plugin/) serves what it says is enabled. docs/architecture.md
draws the arrows.
"""
