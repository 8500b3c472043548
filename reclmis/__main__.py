import sys

from reclmis.cli import main

sys.exit(main())
