"""Built-in adapters, one module per upstream; each registers through an entry point."""
