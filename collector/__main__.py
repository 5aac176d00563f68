"""`python -m collector`: the metrics sidecar. Not built yet; it exits with a clear message."""

import sys

print("llamabridge collector: not built yet (lifetime metrics arrive in a later release)", file=sys.stderr)
sys.exit(2)
