"""OCI runtime-spec side: config.json loading and validation, the state store."""
