"""Graph rewrites: the rule framework, shape inference, constant folding, cleanup and fusions."""
