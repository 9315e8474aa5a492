"""qMachina domain: specs, settings, CLI."""
