"""``python -m sslplug``, as torchrun needs."""

from sslplug.commands import main

raise SystemExit(main())
