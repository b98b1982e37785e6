"""`python -m skip2lora.cli ...`: the same as the `skip2lora` command (the experiment runner starts runs this way)."""

import sys

from . import main

sys.exit(main())
