"""Entry point of the ``msilo`` command."""

from msilo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
