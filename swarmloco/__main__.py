import sys

from swarmloco.app.cli import main

sys.exit(main())
