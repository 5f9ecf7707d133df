"""The engine: `explain` ties the method (caffast.core) to a backend (caffast.backends) and picks the solver."""
