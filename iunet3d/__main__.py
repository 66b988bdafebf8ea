"""``python -m iunet3d`` runs the same CLI as the ``iunet3d`` console script."""

import sys

from iunet3d.cli import main

sys.exit(main())
