"""Built-in memory strategies, one module each; select one by its module name."""
