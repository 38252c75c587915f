"""Framework integrations. Each subpackage imports its framework; they never import each other."""
