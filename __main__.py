"""``python -m sockserve``: the command line."""

from sockserve.core._cli import main

raise SystemExit(main())
