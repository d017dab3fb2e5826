"""``python -m qswap`` runs the command line."""

from qswap.cli import main

raise SystemExit(main())
