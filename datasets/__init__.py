"""Built-in dataset plugins, one module per dataset family, registered by entry point."""
