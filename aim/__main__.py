import sys

from aim.app.cli import main

sys.exit(main())
