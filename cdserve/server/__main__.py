import sys

from cdserve.server.cli import main

sys.exit(main())
