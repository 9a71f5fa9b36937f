"""``python -m gateway`` is the same as the ``dde-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
