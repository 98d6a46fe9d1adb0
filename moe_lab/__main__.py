import sys

from moe_lab.cli import main

sys.exit(main())
