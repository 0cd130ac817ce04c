"""`python -m ebsfs` is the `ebsfs` command."""

from ebsfs.cli.main import run

run()
