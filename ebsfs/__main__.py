"""`python -m ebsfs` is the `ebsfs` command."""

import sys

from ebsfs.cli.main import main

sys.exit(main())
