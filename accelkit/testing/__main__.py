"""`python -m accelkit.testing BACKEND [pytest options]`: the conformance kit against BACKEND."""
import sys

from accelkit.testing import main

sys.exit(main())
