"""`python -m mistral_ext ...` is the `mistral-ext` command line."""
from .cli import main

raise SystemExit(main())
