"""``python -m cli``: the ``beit-data`` command."""

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="beit-data"))
