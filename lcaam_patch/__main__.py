"""`python -m lcaam_patch`: the `lcaam-patch` command line."""

from .cli import main

raise SystemExit(main())
