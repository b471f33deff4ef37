"""The `trajstore` command line: a thin click layer over trajstore and distill."""
