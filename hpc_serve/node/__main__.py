"""`python -m hpc_serve.node ...`: the node agent on one node (see hpc_serve.node.agent)."""

import sys

from .agent import main

sys.exit(main())
