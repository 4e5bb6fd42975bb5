"""An example third-party pflbench plugin (a method and a dataset), installed with pip."""
