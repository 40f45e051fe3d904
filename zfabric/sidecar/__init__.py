"""The reliable-delivery sidecar: retry policy, attempt ledger, SQLite store, and the service that wires them to sockets."""
