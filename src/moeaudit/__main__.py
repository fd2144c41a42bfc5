"""``python -m moeaudit``: the command line."""

from moeaudit.cli import main

main()
