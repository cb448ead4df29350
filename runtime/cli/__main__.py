"""``python -m clipinspect.runtime.cli``: the ``clipinspect`` command without the console script."""

import sys

from . import main

sys.exit(main())
