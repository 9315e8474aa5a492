"""Modeling sessions: a model built in gated steps, or given whole as one YAML text."""
