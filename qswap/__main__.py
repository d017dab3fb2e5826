"""``python -m qswap`` runs the command line."""

from qswap.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
