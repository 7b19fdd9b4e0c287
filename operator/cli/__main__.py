import sys

from agentlat.operator.cli import main

sys.exit(main.main())
