"""The service's operational state in PostgreSQL (`store.StateStore`) and its schema migrations."""
