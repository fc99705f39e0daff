"""The ``sourcefree`` command line (click); the entry point is ``sourcefree.cli.app:main``."""
