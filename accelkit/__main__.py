"""`python -m accelkit` is the `accelkit` command."""
import sys

from accelkit.cli import main

sys.exit(main())
