import sys

from virtnode.cli import main

sys.exit(main())
