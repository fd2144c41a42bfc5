"""``python -m moeaudit.bench``."""

import sys

from moeaudit.bench import main

raise SystemExit(main(sys.argv[1:]))
