"""``python -m sourcefree`` runs the command line."""

from sourcefree.cli import main

main()
