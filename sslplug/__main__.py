"""``python -m sslplug``, as torchrun needs."""

from sslplug.cli import main

raise SystemExit(main())
