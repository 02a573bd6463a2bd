"""``python -m dragrt.bench ...``: the same as ``dragrt bench ...``."""

from dragrt.bench.cli import main

raise SystemExit(main())
