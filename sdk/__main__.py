"""``python -m sourcefree`` runs the command line."""

from sourcefree.cli.app import main

main()
