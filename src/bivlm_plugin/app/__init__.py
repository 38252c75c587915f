"""Workflows that wire data, models and the integrations (the ``bivlm`` command's back end)."""
