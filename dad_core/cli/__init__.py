"""Entry points: argv -> typed config -> one library call -> outputs. Only this package configures logging."""
