from tests.engine.support import store

__all__ = ["store"]
