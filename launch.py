"""The seed's name for the daemon's entry point: the same as `python supervisor.py`."""
import sys

from supervisor import main

if __name__ == "__main__":
    sys.exit(main())
