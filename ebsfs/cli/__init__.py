"""The command line: options, one-line errors, exit codes."""
