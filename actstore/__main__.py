import sys

from actstore.cli import main

sys.exit(main())
