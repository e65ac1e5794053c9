"""The kata-py command line: one module per subcommand, each thin."""
