import sys

from silo_agent.cli import main

sys.exit(main())
