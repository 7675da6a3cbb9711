"""`python -m training ...` entry point."""

from training.cli import main

raise SystemExit(main())
