"""The control plane: the JSON-lines control socket and the verbs it runs on the model.

It imports the model (nvdimm/) and never the data path: the plugin hands it the registry
of exports to act on (docs/architecture.md).
"""
