import sys

from virtnode.command import main

sys.exit(main())
