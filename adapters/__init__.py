"""Adaptation methods, one file each; importing a module registers its method."""
