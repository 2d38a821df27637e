"""Command line: `python -m fastmoe_load bench`."""

from .cli import main

raise SystemExit(main())
