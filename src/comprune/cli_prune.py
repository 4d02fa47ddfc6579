"""CLI commands for pruning, export and comparison (filled in as those APIs land)."""


def add_commands(sub, add_common):
    pass
