"""Adapters to other KV-compression libraries. Each is optional: importing scope_kv never
imports them, and they import nothing from the library they adapt."""
