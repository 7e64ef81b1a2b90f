"""Built-in steps, one module per family."""
