"""``python -m tirelib``: the same command line as the ``tirelib`` script."""

from __future__ import annotations

from tirelib.cli import main

if __name__ == "__main__":
    main()
