"""`bttctl`, the ndctl-style command line: serving, namespace verbs, check-namespace."""
