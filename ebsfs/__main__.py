"""`python -m ebsfs` is the `ebsfs` command."""

import sys

from ebsfs.cli import main

sys.exit(main())
