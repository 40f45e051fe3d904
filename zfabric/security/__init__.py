"""Security: CURVE keys, who may connect (allowlist + ZAP, failing closed), what each key may do (permissions)."""
