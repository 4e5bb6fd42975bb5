"""Built-in federated methods, one module each, registered by entry point like any plugin."""
