"""``python -m gateway`` is the same as ``mtls-gateway``."""

import sys

from gateway.cli import main

sys.exit(main())
