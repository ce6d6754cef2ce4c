"""The `hmkd` command line."""
